//! `bench-transfer` (`make bench-transfer`): the transfer endpoint's
//! figures (docs/transfer.md), over loopback, on a file of `--size-mib`
//! (default 1024) in a scratch directory under `--dir` (default /var/tmp).
//!
//! The endpoint runs as a child process (this binary with the hidden
//! `--serve` mode: the agent library's `transfer::serve_on` on a loopback
//! port, the multi-threaded tokio runtime the agent uses), so its resident
//! set can be read from `/proc/<pid>/status`.
//!
//! 1. Upload: the agent's own streaming tus client (`transfer::client`,
//!    reqwest, one PATCH streamed from the file) uploads the file; MiB/s
//!    over the whole `client::upload` call: its one pass over the file for
//!    the whole digest and the chunk digests, the POST, and the streamed
//!    PATCH up to the 204 (a plain blake3 of the file is timed first, for
//!    scale). Target ≥ 0.8 of our download.
//!    Then the disk's own ceiling: the same size written in 1 MiB blocks
//!    and fdatasynced once, beside the upload's ratio to it (an upload is
//!    durable before its 204, so the disk bounds it), and the ceiling's
//!    ratio to our download: the most the upload ratio can be on that
//!    storage. `--dir /dev/shm` takes the disk out (tmpfs). Also the
//!    download through our own journaled client into a durable file under
//!    `--dir` (checkpoints, whole digest), and the upload's ratio to it:
//!    the same work as an upload, in the other direction.
//! 2. Download: `curl -o /dev/null` of the uploaded file from our endpoint
//!    and from a Debian nginx (own temporary config, a free loopback port,
//!    `sendfile on`, serving a hard link to the same file, so the same
//!    page cache), `--rounds` (5) alternating rounds each; the ratio of
//!    medians (and of bests, the machine being shared).
//!    Target ≥ 0.9.
//! 3. Resume cost: an in-process endpoint (8 MiB checkpoints); the client's
//!    upload is killed (task aborted, connection dropped) once it has sent
//!    50%, then resumed. Prints the bytes the sender sent twice (sent in
//!    the first attempt past the resume point: what the server cut back
//!    plus what was still in socket buffers) and what the server received
//!    and cut back. Target: ≤ one checkpoint.
//! 4. Memory: the child endpoint's peak RSS (sampled every 20 ms, and its
//!    VmHWM) while it serves 4 concurrent 1 GiB transfers: 2 curl
//!    downloads and 2 uploads from the client. Target ≤ 64 MiB.
//!
//! Prints figures with their targets, "met" or "MISSED"; asserts nothing
//! about time. Options: `--size-mib N`, `--dir D`, `--only
//! upload|download|resume|memory` (upload always runs first: it puts the
//! file in place), `--keep` (leave the scratch directory).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sparegrid_agent::transfer::client::{self, UploadOptions};
use sparegrid_agent::transfer::{self, token, Direction, TransferConfig, TransferState};

const KEY: &str = "bench-transfer-key";
const MIB: u64 = 1024 * 1024;

#[derive(Parser, Debug)]
#[command(about = "transfer endpoint benchmark (docs/transfer.md)")]
struct Args {
    /// Size of the test file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where the scratch directory goes.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// One figure only: upload, download, resume or memory.
    #[arg(long)]
    only: Option<String>,
    /// Keep the scratch directory.
    #[arg(long)]
    keep: bool,
    /// Download rounds (each: ours, then nginx).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Internal: run the endpoint on DIR and print its address.
    #[arg(long, hide = true)]
    serve: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.serve {
        return serve(dir);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(args))
}

/// The child endpoint: serves `dir` until killed.
fn serve(dir: &Path) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let config = TransferConfig {
            enabled: true,
            dir: dir.to_owned(),
            max_upload_bytes: 1 << 40,
            ..TransferConfig::default()
        };
        let state = TransferState::new(&config, Path::new("/"), KEY.as_bytes())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        transfer::serve_on(listener, state, std::future::pending()).await?;
        Ok(())
    })
}

struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tok(id: &str, d: Direction) -> String {
    token::sign(
        KEY.as_bytes(),
        id,
        d,
        SystemTime::now() + Duration::from_secs(24 * 3600),
    )
    .expect("valid id")
}

/// Writes `size` pseudo-random bytes (xorshift) in 1 MiB blocks.
fn make_file(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut block = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Time to write `size` bytes to a new file at `path` in 1 MiB blocks and
/// fdatasync it once.
fn disk_ceiling(path: &Path, size: u64) -> Result<Duration> {
    let block = vec![0x5au8; MIB as usize];
    let t = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.sync_data()?;
    Ok(t.elapsed())
}

fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// RSS and peak RSS (VmHWM) of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// curl's download: (HTTP code, bytes, seconds).
fn curl_get(url: &str, auth: Option<&str>) -> Result<(u16, u64, f64)> {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]);
    if let Some(a) = auth {
        c.args(["-H", &format!("Authorization: Bearer {a}")]);
    }
    let o = c
        .arg(url)
        .output()
        .context("curl (make deps installs it)")?;
    if !o.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let mut it = out.split_whitespace();
    let code = it.next().unwrap_or("0").parse()?;
    let bytes = it.next().unwrap_or("0").parse()?;
    let secs = it.next().unwrap_or("0").parse()?;
    Ok((code, bytes, secs))
}

/// Our own nginx on a free loopback port serving `www`.
fn start_nginx(dir: &Path, www: &Path) -> Result<(KillOnDrop, u16)> {
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nuser root;\n\
             pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
               client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
               fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n\
               scgi_temp_path {d}/nginx-scgi;\n\
               server {{ listen 127.0.0.1:{port}; root {w}; }}\n}}\n",
            d = dir.display(),
            w = www.display(),
        ),
    )?;
    let child = Command::new("nginx")
        .args(["-p"])
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("nginx (make deps installs nginx-light)")?;
    let child = KillOnDrop(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((child, port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "nginx did not listen on {port}: {}",
        std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
    )
}

async fn run(args: Args) -> Result<()> {
    let size = args.size_mib * MIB;
    let scratch = Scratch {
        path: args
            .dir
            .join(format!("sparegrid-bench-transfer-{}", std::process::id())),
        keep: args.keep,
    };
    let root = scratch.path.clone();
    std::fs::create_dir_all(&root)?;
    let only = args.only.as_deref();
    if let Some(o) = only {
        if !["upload", "download", "resume", "memory"].contains(&o) {
            bail!("--only: expected upload, download, resume or memory, got {o:?}");
        }
    }
    let want = |f: &str| only.is_none() || only == Some(f);
    println!(
        "bench-transfer: {} MiB file in {} (loopback)",
        args.size_mib,
        root.display()
    );
    let src = root.join("source.bin");
    let t = Instant::now();
    make_file(&src, size)?;
    println!("  made the source file in {:.1?}", t.elapsed());

    // The endpoint as a child process.
    let me = std::env::current_exe()?;
    let mut child = Command::new(&me)
        .arg("--serve")
        .arg(root.join("endpoint"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
    let child = KillOnDrop(child);
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .context("the endpoint did not print its address")?
        .parse()?;
    let base = format!("http://{addr}");
    println!(
        "  endpoint: pid {pid} on {addr}, RSS idle {} KiB",
        rss_kib(pid).map_or(0, |r| r.0)
    );

    // 1. Upload (always: it puts the file in place for the downloads).
    let http = reqwest::Client::new();
    let jdir = root.join("client-journals");
    std::fs::create_dir_all(&jdir)?;
    let t = Instant::now();
    let digest = {
        let s = src.clone();
        tokio::task::spawn_blocking(move || client::hash_file(&s)).await??
    };
    println!("  client blake3 of the file: {:.2?}", t.elapsed());
    let _ = digest;
    let t = Instant::now();
    let rep = client::upload(
        &http,
        &base,
        &tok("bench", Direction::Upload),
        "bench",
        &src,
        &jdir,
        &UploadOptions::default(),
    )
    .await?;
    let up_time = t.elapsed();
    let upload_mibs = mibs(rep.size, up_time);
    println!(
        "upload (tus, our client, one streamed PATCH): {upload_mibs:.0} MiB/s ({up_time:.2?}, digest verified)"
    );

    // 2. Download: ours vs nginx, alternating.
    let mut ours = Vec::new();
    let mut nginx = Vec::new();
    let mut download_mibs = None;
    if want("download") || want("upload") {
        let www = root.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::hard_link(root.join("endpoint/complete/bench"), www.join("bench"))?;
        let (_nginx, port) = start_nginx(&root, &www)?;
        let our_url = format!("{base}/v1/files/bench");
        let ng_url = format!("http://127.0.0.1:{port}/bench");
        let auth = tok("bench", Direction::Download);
        // Warm the page cache once.
        curl_get(&ng_url, None)?;
        for round in 1..=args.rounds.max(1) {
            let (c, b, s) = curl_get(&our_url, Some(&auth))?;
            if c != 200 || b != size {
                bail!("our download: HTTP {c}, {b} bytes");
            }
            ours.push(b as f64 / MIB as f64 / s);
            let (c, b, s) = curl_get(&ng_url, None)?;
            if c != 200 || b != size {
                bail!("nginx download: HTTP {c}, {b} bytes");
            }
            nginx.push(b as f64 / MIB as f64 / s);
            println!(
                "  round {round}: ours {:.0} MiB/s, nginx {:.0} MiB/s",
                ours[ours.len() - 1],
                nginx[nginx.len() - 1]
            );
        }
        let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let (ob, nb) = (best(&ours), best(&nginx));
        let o = median(&mut ours);
        let n = median(&mut nginx);
        download_mibs = Some(o);
        let ratio = o / n;
        println!(
            "download (curl, {} rounds): ours median {o:.0} best {ob:.0} MiB/s, nginx median {n:.0} best {nb:.0} MiB/s; ratio of medians {ratio:.2}, of bests {:.2} (target >= 0.9: {})",
            args.rounds,
            ob / nb,
            verdict(ratio >= 0.9)
        );
    }
    if let Some(d) = download_mibs {
        let ratio = upload_mibs / d;
        println!(
            "upload / our download: {ratio:.2} (target >= 0.8: {})",
            verdict(ratio >= 0.8)
        );
        // The same direction as the upload's work: our own journaled
        // download client (what agents fetch images and saved state with)
        // writing the file under --dir with its checkpoints and checking
        // the whole digest, so each side pays for a durable copy.
        let dest = root.join("client-download.bin");
        let t = Instant::now();
        let rep = client::download(
            &http,
            &format!("{base}/v1/files/bench"),
            &tok("bench", Direction::Download),
            &dest,
            transfer::TransferConfig::default().checkpoint_bytes,
            Arc::default(),
        )
        .await?;
        let took = t.elapsed();
        let _ = std::fs::remove_file(&dest);
        let client_mibs = mibs(rep.size, took);
        println!(
            "download (our journaled client, to a durable file, digest checked): {client_mibs:.0} MiB/s ({took:.2?}); upload / that download: {:.2}",
            upload_mibs / client_mibs
        );
    }
    // What the disk under --dir absorbs: an upload is durable before its
    // 204 (fsync, then the rename), so it cannot be faster than this.
    let disk = {
        let p = root.join("disk-ceiling.bin");
        let r = tokio::task::spawn_blocking(move || {
            let r = disk_ceiling(&p, size);
            let _ = std::fs::remove_file(&p);
            r
        })
        .await??;
        mibs(size, r)
    };
    println!(
        "disk ceiling under {} (write {} MiB + one fdatasync, no hashing): {disk:.0} MiB/s; upload / disk ceiling: {:.2}",
        args.dir.display(),
        args.size_mib,
        upload_mibs / disk
    );
    if let Some(d) = download_mibs {
        // No upload can beat writing the file alone: this is the most the
        // upload / download ratio can be on this storage.
        println!(
            "disk ceiling / our download: {:.2} (the highest upload / download ratio this storage allows)",
            disk / d
        );
    }

    // 3. Resume cost.
    if want("resume") {
        resume_cost(&root, &src, size).await?;
    }

    // 4. Memory under 4 concurrent transfers.
    if want("memory") {
        memory(pid, &base, &src, &jdir).await?;
    }
    drop(child);
    Ok(())
}

async fn resume_cost(root: &Path, src: &Path, size: u64) -> Result<()> {
    let config = TransferConfig {
        enabled: true,
        dir: root.join("resume-endpoint"),
        max_upload_bytes: 1 << 40,
        ..TransferConfig::default()
    };
    let cp = config.checkpoint_bytes;
    let state = TransferState::new(&config, Path::new("/"), KEY.as_bytes())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server_state = state.clone();
    let server = tokio::spawn(transfer::serve_on(
        listener,
        server_state,
        std::future::pending(),
    ));
    let jdir = root.join("resume-journals");
    std::fs::create_dir_all(&jdir)?;
    let opts = UploadOptions {
        checkpoint_bytes: cp,
        sent: Arc::new(AtomicU64::new(0)),
        digests: None,
    };
    let http = reqwest::Client::new();
    let token = tok("resume", Direction::Upload);
    let task = {
        let (http, base, token, src, jdir, opts) = (
            http.clone(),
            base.clone(),
            token.clone(),
            src.to_owned(),
            jdir.clone(),
            opts.clone(),
        );
        tokio::spawn(async move {
            client::upload(&http, &base, &token, "resume", &src, &jdir, &opts).await
        })
    };
    // Half-way, plus a bit so the kill does not land on a checkpoint
    // boundary (which would flatter the figure).
    let kill_at = size / 2 + cp * 3 / 8;
    while opts.sent.load(Ordering::Relaxed) < kill_at && !task.is_finished() {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    task.abort();
    let _ = task.await;
    // Let the server notice the dropped connection and cut back, and the
    // client's connection task (it polls the body, not the aborted task)
    // stop: only then is the count of bytes sent final.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = opts.sent.load(Ordering::Relaxed);
    let rep = client::upload(&http, &base, &token, "resume", src, &jdir, &opts).await?;
    let twice = first.saturating_sub(rep.resumed_at);
    let cut = state.store().discarded_bytes();
    println!(
        "resume cost (killed at {:.0}%): resumed at {} MiB; sent twice {:.2} MiB = server cut back {:.2} MiB + {:.2} MiB in flight (checkpoint {} MiB; target <= one checkpoint: {})",
        first as f64 * 100.0 / size as f64,
        rep.resumed_at / MIB,
        twice as f64 / MIB as f64,
        cut as f64 / MIB as f64,
        twice.saturating_sub(cut) as f64 / MIB as f64,
        cp / MIB,
        verdict(twice <= cp)
    );
    server.abort();
    Ok(())
}

async fn memory(pid: u32, base: &str, src: &Path, jdir: &Path) -> Result<()> {
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((rss, _)) = rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let before = rss_kib(pid).map_or(0, |r| r.0);
    let t = Instant::now();
    let mut downloads = Vec::new();
    for _ in 0..2 {
        let url = format!("{base}/v1/files/bench");
        let auth = tok("bench", Direction::Download);
        downloads.push(tokio::task::spawn_blocking(move || {
            curl_get(&url, Some(&auth))
        }));
    }
    let mut uploads = Vec::new();
    for i in 0..2 {
        let id = format!("mem{i}");
        let (base, src, jdir) = (base.to_owned(), src.to_owned(), jdir.to_owned());
        uploads.push(tokio::spawn(async move {
            client::upload(
                &reqwest::Client::new(),
                &base,
                &tok(&id, Direction::Upload),
                &id,
                &src,
                &jdir,
                &UploadOptions::default(),
            )
            .await
        }));
    }
    for d in downloads {
        let (c, _, _) = d.await??;
        if c != 200 {
            bail!("download during the memory run: HTTP {c}");
        }
    }
    for u in uploads {
        u.await??;
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let peak_kib = peak.load(Ordering::Relaxed);
    let hwm = rss_kib(pid).map_or(0, |r| r.1);
    println!(
        "memory: endpoint RSS {:.1} MiB before, peak {:.1} MiB sampled, VmHWM {:.1} MiB over 2 downloads + 2 uploads of the file at once ({:.1?}) (target <= 64 MiB: {})",
        before as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        hwm as f64 / 1024.0,
        t.elapsed(),
        verdict(hwm <= 64 * 1024)
    );
    Ok(())
}
