//! `bench-tunnel`: the tunnel endpoint against wireguard-go, side by side
//! in one run (`make bench-tunnel`, root).
//!
//! Two network namespaces on a bridge (tests/tests/tunnel_netns/lab.rs);
//! in each round, for each implementation (order alternating between
//! rounds): both ends run it, and we measure
//! - TCP throughput through the tunnel with iperf3 (`-J`, the receiver's
//!   figure);
//! - the round-trip time the tunnel adds: median ICMP echo RTT over the
//!   tunnel minus the median over the bare underlay (same namespaces);
//! - CPU time per GiB moved, of both endpoint processes together and of
//!   the sending and receiving end apart (utime + stime from
//!   /proc/PID/stat around the iperf3 run).
//!
//! The machine is shared, so single figures are noisy: the summary gives
//! medians over rounds and the ratio ours / wireguard-go, measured under
//! the same conditions. Takes the machine-wide test lock (its CPU use would
//! count as customer load to the end-to-end tests).

#[path = "../../tests/tunnel_netns/lab.rs"]
mod lab;

use std::net::SocketAddrV4;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lab::*;

#[derive(Parser)]
#[command(about = "tunnel endpoint vs wireguard-go: throughput, added RTT, CPU per GiB")]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Rounds (each runs both implementations).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// ICMP echoes per latency figure.
    #[arg(long, default_value_t = 200)]
    pings: usize,
    /// iperf3 parallel streams.
    #[arg(long, default_value_t = 1)]
    streams: u32,
    /// Only one implementation: "ours" or "wireguard-go".
    #[arg(long)]
    only: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Impl {
    Ours,
    WgGo,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::WgGo => "wireguard-go",
        }
    }
}

#[derive(Debug, Clone)]
struct Figures {
    bits_per_s: f64,
    bytes: u64,
    rtt_tunnel_us: f64,
    rtt_veth_us: f64,
    cpu_s_sender: f64,
    cpu_s_receiver: f64,
}

impl Figures {
    fn gib(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64
    }
    fn cpu_per_gib(&self) -> f64 {
        (self.cpu_s_sender + self.cpu_s_receiver) / self.gib()
    }
}

const PORT: u16 = 51820;

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(reason) = skip_reason(true) {
        bail!("bench-tunnel cannot run: {reason}");
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        bail!("bench-tunnel needs iperf3 (make deps installs it)");
    }
    let bin = tunnel_bin();
    println!("sparegrid-tunnel: {}", bin.display());
    let _lock = sparegrid_tests::exclusive("bench-tunnel");
    let impls: Vec<Impl> = match args.only.as_deref() {
        None => vec![Impl::Ours, Impl::WgGo],
        Some("ours") => vec![Impl::Ours],
        Some("wireguard-go") => vec![Impl::WgGo],
        Some(o) => bail!("--only {o}: expected ours or wireguard-go"),
    };
    let mut results: Vec<(Impl, Figures)> = Vec::new();
    for round in 0..args.rounds {
        let mut order = impls.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let f =
                run_one(which, &args).with_context(|| format!("{} round {round}", which.name()))?;
            println!(
                "round {round} {:<12} {:>8.0} Mbit/s  rtt +{:>5.0} us (tunnel {:.0} us, veth {:.0} us)  cpu {:.2} s/GiB (sender {:.2} s, receiver {:.2} s for {:.2} GiB)",
                which.name(),
                f.bits_per_s / 1e6,
                f.rtt_tunnel_us - f.rtt_veth_us,
                f.rtt_tunnel_us,
                f.rtt_veth_us,
                f.cpu_per_gib(),
                f.cpu_s_sender,
                f.cpu_s_receiver,
                f.gib()
            );
            results.push((which, f));
        }
    }
    println!();
    let med = |which: Impl, f: &dyn Fn(&Figures) -> f64| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|(w, _)| *w == which)
            .map(|(_, x)| f(x))
            .collect();
        median(&mut v)
    };
    for &which in &impls {
        println!(
            "{:<12} median {:>8.0} Mbit/s  added rtt {:>5.0} us  cpu {:.2} s/GiB ({} rounds, {} s each, {} stream(s))",
            which.name(),
            med(which, &|f| f.bits_per_s) / 1e6,
            med(which, &|f| f.rtt_tunnel_us - f.rtt_veth_us),
            med(which, &|f| f.cpu_per_gib()),
            args.rounds,
            args.seconds,
            args.streams
        );
    }
    if impls.len() == 2 {
        let ratio = med(Impl::Ours, &|f| f.bits_per_s) / med(Impl::WgGo, &|f| f.bits_per_s);
        let per_round: Vec<String> = (0..args.rounds)
            .map(|r| {
                let of = |w: Impl| {
                    results
                        .iter()
                        .filter(|(x, _)| *x == w)
                        .nth(r)
                        .map(|(_, f)| f.bits_per_s)
                        .unwrap_or(f64::NAN)
                };
                format!("{:.2}", of(Impl::Ours) / of(Impl::WgGo))
            })
            .collect();
        println!(
            "throughput ratio ours / wireguard-go: {ratio:.2} (target >= 1.0; per round: {})",
            per_round.join(", ")
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3; utime and stime are fields 14 and 15.
    let utime: f64 = f[11].parse()?;
    let stime: f64 = f[12].parse()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) / hz)
}

fn run_one(which: Impl, args: &Args) -> Result<Figures> {
    let lab = Lab::new("bench", 2);
    let (a_priv, a_pub) = keypair();
    let (b_priv, b_pub) = keypair();
    let spec = |i: usize, public: &str| PeerSpec {
        public: public.to_string(),
        endpoint: Some(SocketAddrV4::new(lab.hosts[i].underlay, PORT)),
        allowed: vec![lab.hosts[i].slice()],
    };
    // Keep the processes alive for the whole run; pids for CPU figures.
    let (_ours, _wg, pids) = match which {
        Impl::Ours => {
            let a = Ours::start(&lab, 0, PORT, Some(&a_priv), &[spec(1, &b_pub)]);
            let b = Ours::start(&lab, 1, PORT, Some(&b_priv), &[spec(0, &a_pub)]);
            let pids = (a.pid(), b.pid());
            (vec![a, b], vec![], pids)
        }
        Impl::WgGo => {
            let a = WgGo::start(&lab, 0, PORT, &a_priv, &[spec(1, &b_pub)]);
            let b = WgGo::start(&lab, 1, PORT, &b_priv, &[spec(0, &a_pub)]);
            let pids = (a.child.id(), b.child.id());
            (vec![], vec![a, b], pids)
        }
    };
    let (h0, h1) = (&lab.hosts[0], &lab.hosts[1]);
    if !ping_until(&h0.ns, h1.overlay, Duration::from_secs(30)) {
        bail!("no traffic through the tunnel");
    }
    let rtt = |dst| -> Result<f64> {
        let mut v: Vec<f64> = ping_many(
            &h0.ns,
            dst,
            args.pings,
            Duration::from_secs(1),
            Duration::from_millis(5),
        )
        .into_iter()
        .flatten()
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
        if v.len() < args.pings / 2 {
            bail!(
                "only {} of {} echoes to {dst} answered",
                v.len(),
                args.pings
            );
        }
        Ok(median(&mut v))
    };
    let rtt_veth_us = rtt(h1.underlay)?;
    let rtt_tunnel_us = rtt(h1.overlay)?;

    let server = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h1.ns))
        .args([
            "--",
            "iperf3",
            "-s",
            "-B",
            &h1.overlay.to_string(),
            "-p",
            "5201",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    let _server = KillOnDrop(server);
    let cpu0 = (cpu_seconds(pids.0)?, cpu_seconds(pids.1)?);
    // The server may not listen yet: a refused client is retried.
    let end = Instant::now() + Duration::from_secs(10);
    let json = loop {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h0.ns))
            .args([
                "--",
                "iperf3",
                "-c",
                &h1.overlay.to_string(),
                "-p",
                "5201",
                "-t",
                &args.seconds.to_string(),
                "-P",
                &args.streams.to_string(),
                "-J",
            ])
            .stdin(Stdio::null())
            .output()
            .context("iperf3 client")?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "iperf3 output: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        match json.get("error") {
            Some(e) if Instant::now() < end && e.to_string().contains("refused") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(e) => bail!("iperf3: {e}"),
            None => break json,
        }
    };
    let cpu1 = (cpu_seconds(pids.0)?, cpu_seconds(pids.1)?);
    let recv = &json["end"]["sum_received"];
    let bytes = recv["bytes"].as_u64().context("sum_received.bytes")?;
    let bits_per_s = recv["bits_per_second"]
        .as_f64()
        .context("bits_per_second")?;
    Ok(Figures {
        bits_per_s,
        bytes,
        rtt_tunnel_us,
        rtt_veth_us,
        cpu_s_sender: cpu1.0 - cpu0.0,
        cpu_s_receiver: cpu1.1 - cpu0.1,
    })
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
