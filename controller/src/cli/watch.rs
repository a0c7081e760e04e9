//! `sparegrid watch`: follows a job to its end. It reads the job's
//! server-sent `progress`/`end` events and, when the stream cannot be
//! opened or breaks before `end`, polls `GET /v1/jobs/{id}` every
//! [`POLL_INTERVAL`] instead. People see an indicatif progress bar (done
//! of total, running and failed counts, rate, ETA) and a closing summary;
//! `--json` prints each change as one [`ProgressEvent`] JSON line.

use std::io::BufReader;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::client::{body_text, decode, Client, SseReader};
use super::output::{counts_line, duration_ms};
use super::{CliError, Io};
use crate::api::{JobDetail, ProgressEvent};
use crate::store::JobState;

/// How often the polling fallback asks for the job.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Options of one watch.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Skip the event stream and poll from the start.
    pub poll_only: bool,
    pub poll_interval: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll_only: false,
            poll_interval: POLL_INTERVAL,
        }
    }
}

/// What shows progress: the bar (people) or JSON lines (`--json`).
struct Display {
    json: bool,
    show_bar: bool,
    bar: Option<ProgressBar>,
    last: Option<ProgressEvent>,
    started: Instant,
}

impl Display {
    fn update(&mut self, io: &mut Io<'_>, ev: ProgressEvent) -> Result<(), CliError> {
        if self.last.as_ref() == Some(&ev) {
            return Ok(());
        }
        if self.json {
            let line = serde_json::to_string(&ev).map_err(|e| CliError::Decode {
                url: String::new(),
                message: e.to_string(),
            })?;
            writeln!(io.out, "{line}").map_err(CliError::Output)?;
        } else {
            let c = &ev.counts;
            let bar = self.bar.get_or_insert_with(|| {
                let target = if self.show_bar {
                    ProgressDrawTarget::stderr()
                } else {
                    ProgressDrawTarget::hidden()
                };
                let bar = ProgressBar::with_draw_target(Some(c.total), target)
                    .with_position(c.done)
                    .with_prefix(ev.id.to_string());
                let style = ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {pos}/{len} done, {msg}, {per_sec} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            });
            bar.set_length(c.total);
            bar.set_position(c.done);
            bar.set_message(format!(
                "{} running, {} failed{}",
                c.assigned,
                c.dead,
                if ev.state == JobState::Queued {
                    " (queued)"
                } else {
                    ""
                }
            ));
        }
        self.last = Some(ev);
        Ok(())
    }

    /// Clears the bar, prints the summary, and gives the exit code.
    fn finish(mut self, io: &mut Io<'_>) -> Result<i32, CliError> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let Some(ev) = self.last else {
            return Ok(1);
        };
        if !self.json {
            writeln!(
                io.out,
                "job {} {}: {} ({} watched)",
                ev.id,
                ev.state,
                counts_line(&ev.counts),
                duration_ms(i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX))
            )
            .map_err(CliError::Output)?;
        }
        Ok(if ev.state == JobState::Done { 0 } else { 1 })
    }
}

/// Watches job `id` until it is done (exit code 0) or failed or cancelled
/// (1).
pub fn watch(
    client: &Client,
    id: &str,
    opts: WatchOptions,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let mut display = Display {
        json: io.json,
        show_bar: io.progress,
        bar: None,
        last: None,
        started: Instant::now(),
    };
    if !opts.poll_only {
        match follow_events(client, id, &mut display, io) {
            Ok(true) => return display.finish(io),
            Ok(false) => {}
            // The job does not exist, the token is refused, the controller
            // is unreachable: polling would fail the same way.
            Err(e @ (CliError::Api { .. } | CliError::Connect { .. })) if !is_no_route(&e) => {
                if let Some(bar) = display.bar.take() {
                    bar.finish_and_clear();
                }
                return Err(e);
            }
            Err(e) => {
                let msg = format!("event stream unavailable ({e}); polling instead");
                match &display.bar {
                    Some(bar) => bar.println(msg),
                    None if !io.json => {
                        let _ = writeln!(io.err, "{msg}");
                    }
                    None => {}
                }
            }
        }
    }
    let result = poll(client, id, opts.poll_interval, &mut display, io);
    match result {
        Ok(()) => display.finish(io),
        Err(e) => {
            if let Some(bar) = display.bar.take() {
                bar.finish_and_clear();
            }
            Err(e)
        }
    }
}

/// A 404 for the route (an older controller without the events route), as
/// opposed to one for the job.
fn is_no_route(e: &CliError) -> bool {
    matches!(e, CliError::Api { body, .. } if body.code == "route_not_found")
}

/// Follows the event stream. `Ok(true)` when it reached `end`; `Ok(false)`
/// when it closed early without an error worth reporting.
fn follow_events(
    client: &Client,
    id: &str,
    display: &mut Display,
    io: &mut Io<'_>,
) -> Result<bool, CliError> {
    let path = format!("/v1/jobs/{id}/events");
    let url = client.url(&path);
    let resp = client.events(&path)?;
    let mut reader = SseReader::new(BufReader::new(resp));
    loop {
        let ev = reader.next_event().map_err(|e| CliError::Http {
            url: url.clone(),
            message: format!("reading the event stream: {e}"),
        })?;
        let Some(ev) = ev else {
            return Err(CliError::Http {
                url,
                message: "the event stream closed before the job ended".to_owned(),
            });
        };
        match ev.event.as_str() {
            "progress" | "end" => {
                let p: ProgressEvent = decode(&ev.data, &url)?;
                let terminal = p.state.is_terminal();
                display.update(io, p)?;
                if terminal || ev.event == "end" {
                    return Ok(true);
                }
            }
            "error" => {
                return Err(CliError::Http {
                    url,
                    message: format!("the controller sent an error event: {}", ev.data),
                })
            }
            _ => {}
        }
    }
}

/// Polls the job until it is terminal.
fn poll(
    client: &Client,
    id: &str,
    every: Duration,
    display: &mut Display,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    let path = format!("/v1/jobs/{id}");
    let url = client.url(&path);
    loop {
        let text = body_text(client.get(&path)?, &url)?;
        let d: JobDetail = decode(&text, &url)?;
        let terminal = d.job.state.is_terminal();
        display.update(
            io,
            ProgressEvent {
                id: d.job.id,
                state: d.job.state,
                counts: d.job.counts,
            },
        )?;
        if terminal {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}
