//! Large subtask outputs on their way to the controller: a successful
//! completion whose stdout spilled to a file (longer than the 1 MiB sent
//! inline; [`crate::subtask::spill_path`] under [`spill_dir`]) is taken out
//! of the batch being reported and uploaded on a thread of its own (so
//! heartbeats and other reports never wait for it):
//!
//! 1. `POST /v1/agents/outputs` ([`OutputRequest`]: the attempt, the
//!    file's size and blake3) grants an upload ([`OutputGrant`]) of id
//!    `out-<job>-<index>-<epoch>` on the controller's `/v1/data`, with an
//!    `up` token for that id only;
//! 2. the transfer crate's tus client uploads the file (resumable, its
//!    journal under `<spill dir>/journals`), up to [`UPLOAD_TRIES`] times
//!    from the last checkpoint both ends hold;
//! 3. the completion goes back to the outbox with
//!    [`Completion::stdout_data`] set and no inline stdout; the controller
//!    checks the file is complete with that size and digest before it
//!    accepts the report.
//!
//! When the controller refuses (it serves no `/v1/data`, the attempt is not
//! this host's any more, 4xx) or the upload keeps failing, the completion
//! goes as before, with the first 1 MiB inline, and a warning says so. The
//! spill file and the client journal are removed once the upload is over
//! either way (the controller holds the verified copy); files left by an
//! agent that stopped meanwhile are removed at the next start
//! ([`Outputs::open`]). In pull mode the heartbeat renews the leases of
//! attempts still uploading, like running ones.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sparegrid_proto::grid::{AttemptRef, Completion, OutputData, OutputGrant, OutputRequest};
use sparegrid_transfer::client::{file_digests, upload, UploadOptions};
use sparegrid_transfer::TransferConfig;

use super::client::ControllerClient;
use super::runner::Runner;
use crate::subtask::spill_path;

/// The route granting an upload.
pub const OUTPUTS_ROUTE: &str = "/v1/agents/outputs";
/// Tries at one upload (each resumes where the last broke off).
pub const UPLOAD_TRIES: u32 = 3;

/// Where stdout spills: `<agent.data_dir>/outputs`.
pub fn spill_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outputs")
}

/// See the module header.
#[derive(Debug)]
pub struct Outputs {
    dir: PathBuf,
    /// Attempts being uploaded now.
    busy: Mutex<HashSet<AttemptRef>>,
}

/// Who uploads: the controller's URL and CA (for the tus client), this host.
#[derive(Clone)]
pub struct Uploader {
    pub outputs: Arc<Outputs>,
    pub runner: Arc<Runner>,
    pub host: String,
    pub controller: crate::config::ControllerSection,
}

impl Outputs {
    /// Creates `dir`, removing what an earlier run left in it.
    pub fn open(dir: &Path) -> std::io::Result<Outputs> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir.join("journals"))?;
        Ok(Outputs {
            dir: dir.to_owned(),
            busy: Mutex::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The spill file of `c` when it is to be uploaded.
    fn spilled(&self, c: &Completion) -> Option<PathBuf> {
        if !c.succeeded() || c.stdout_data.is_some() || c.stdout_size <= c.stdout.len() as u64 {
            return None;
        }
        spill_path(&self.dir, &c.attempt).filter(|p| p.is_file())
    }

    /// Attempts whose output is being uploaded now (pull mode renews
    /// their leases).
    pub fn uploading_attempts(&self) -> Vec<AttemptRef> {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl Uploader {
    /// The completions of `batch` to send now; the others start uploading
    /// and come back to the outbox when done.
    pub fn route(&self, client: &ControllerClient, batch: Vec<Completion>) -> Vec<Completion> {
        let mut now = Vec::with_capacity(batch.len());
        for c in batch {
            let Some(path) = self.outputs.spilled(&c) else {
                now.push(c);
                continue;
            };
            let fresh = self
                .outputs
                .busy
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(c.attempt.clone());
            if !fresh {
                // Cannot happen (a completion is in the outbox or here);
                // sending it inline is the safe answer.
                now.push(c);
                continue;
            }
            let up = self.clone();
            let ctl = client.at(&self.controller.url);
            // A copy in case no thread can be made (the closure is dropped).
            let keep = c.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("st-up-{}", c.attempt.index))
                .spawn(move || up.run(&ctl, c, &path));
            if let Err(e) = spawned {
                tracing::warn!("cannot start an output upload thread, sending the output cut: {e}");
                self.outputs
                    .busy
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&keep.attempt);
                if let Some(p) = spill_path(&self.outputs.dir, &keep.attempt) {
                    let _ = std::fs::remove_file(p);
                }
                now.push(keep);
            }
        }
        now
    }

    /// Uploads, then hands the completion back to the outbox.
    fn run(&self, ctl: &ControllerClient, mut c: Completion, path: &Path) {
        match self.upload(ctl, &c, path) {
            Ok(data) => {
                tracing::info!(subtask = %label(&c.attempt), id = %data.id, bytes = data.size,
                    "output uploaded to the controller");
                c.stdout = Vec::new();
                c.stdout_data = Some(data);
            }
            Err(e) => {
                tracing::warn!(subtask = %label(&c.attempt),
                    "output of {} bytes not uploaded, sending its first {} bytes inline: {e}",
                    c.stdout_size, c.stdout.len());
            }
        }
        let _ = std::fs::remove_file(path);
        self.outputs
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&c.attempt);
        self.runner.requeue_outbox(vec![c]);
        self.runner.notify_reports();
    }

    fn upload(
        &self,
        ctl: &ControllerClient,
        c: &Completion,
        path: &Path,
    ) -> Result<OutputData, String> {
        let size = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        // One pass: the digest the controller checks, and chunk digests the
        // upload uses when the controller's checkpoint length is the
        // default one (otherwise it hashes for itself).
        let digests = Arc::new(
            file_digests(path, TransferConfig::default().checkpoint_bytes)
                .map_err(|e| e.to_string())?,
        );
        let blake3 = digests.blake3.clone();
        let req = OutputRequest {
            host: self.host.clone(),
            attempt: c.attempt.clone(),
            size,
            blake3: blake3.clone(),
        };
        let grant: OutputGrant = ctl
            .post(OUTPUTS_ROUTE, &req, None)
            .map_err(|e| format!("the controller grants no upload: {e}"))?;
        let data = OutputData {
            id: grant.id.clone(),
            size,
            blake3,
        };
        if grant.complete {
            return Ok(data);
        }
        let base = format!(
            "{}{}",
            self.controller.url.trim_end_matches('/'),
            grant.transfer_path
        );
        let journals = self.outputs.dir.join("journals");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting a runtime: {e}"))?;
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if !self.controller.ca_cert.as_os_str().is_empty() {
            for cert in
                super::client::ca_certs(&self.controller.ca_cert).map_err(|e| e.to_string())?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        let opts = UploadOptions {
            checkpoint_bytes: grant.checkpoint_bytes,
            digests: Some(digests),
            ..UploadOptions::default()
        };
        let mut last = String::new();
        for attempt in 1..=UPLOAD_TRIES {
            match rt.block_on(upload(
                &http,
                &base,
                &grant.token,
                &grant.id,
                path,
                &journals,
                &opts,
            )) {
                Ok(r) => {
                    tracing::debug!(id = %grant.id, "uploaded {} bytes, resumed at {}, sent {}",
                        r.size, r.resumed_at, r.sent);
                    let _ = std::fs::remove_file(journals.join(format!("{}.up", grant.id)));
                    return Ok(data);
                }
                Err(e) => {
                    tracing::warn!(id = %grant.id, "output upload try {attempt}/{UPLOAD_TRIES} broke off: {e}");
                    last = e.to_string();
                }
            }
        }
        let _ = std::fs::remove_file(journals.join(format!("{}.up", grant.id)));
        Err(last)
    }
}

fn label(a: &AttemptRef) -> String {
    format!("{}/{}#{}", a.job, a.index, a.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(job: &str, inline: usize, size: u64) -> Completion {
        Completion {
            attempt: AttemptRef {
                job: job.into(),
                index: 1,
                epoch: 2,
            },
            host: "h".into(),
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout: vec![b'x'; inline],
            stderr: Vec::new(),
            stdout_size: size,
            stderr_size: 0,
            duration_ms: 1,
            stdout_data: None,
        }
    }

    #[test]
    fn only_a_successful_spilled_output_is_uploaded_and_open_sweeps() {
        let t = tempfile::tempdir().unwrap();
        let dir = spill_dir(t.path());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("left-over.out"), b"old").unwrap();
        let o = Outputs::open(&dir).unwrap();
        assert!(!dir.join("left-over.out").exists());
        assert!(dir.join("journals").is_dir());

        let c = done("j-1", 10, 100);
        assert_eq!(o.spilled(&c), None, "no spill file");
        let path = spill_path(&dir, &c.attempt).unwrap();
        std::fs::write(&path, vec![b'x'; 100]).unwrap();
        assert_eq!(o.spilled(&c), Some(path.clone()));
        let mut failed = c.clone();
        failed.exit_code = Some(1);
        assert_eq!(o.spilled(&failed), None);
        let mut small = c.clone();
        small.stdout_size = 10;
        assert_eq!(o.spilled(&small), None);
        let mut uploaded = c.clone();
        uploaded.stdout_data = Some(OutputData {
            id: "out-j-1-1-2".into(),
            size: 100,
            blake3: String::new(),
        });
        assert_eq!(o.spilled(&uploaded), None);
        assert_eq!(spill_path(&dir, &done("../x", 1, 2).attempt), None);
    }
}
