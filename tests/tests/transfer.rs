//! The transfer endpoint over real loopback HTTP: an in-process server
//! from the agent library (`transfer::serve_on`), driven by the agent's own
//! journaled client, raw TCP (to cut a body at an exact byte), real `curl`
//! and, when installed, the third-party Python tus client `tuspy`
//! (`SPAREGRID_TUSPY=<python with tuspy>`; the test says so and skips
//! without it).
//!
//! Covered: upload and download resume after a killed connection, a
//! corrupted chunk rejected (460) and re-sent, a whole-file digest mismatch
//! that leaves nothing visible, traversal and oversize attempts, expired
//! and wrong-scope tokens, `curl -C -` resuming a download, a full disk
//! (`root_`: a 1 MiB tmpfs) answering 507 with nothing half-written.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1::Digest as _;
use sparegrid_agent::transfer::client::{self, hash_file, UploadOptions};
use sparegrid_agent::transfer::{self, token, Direction, TransferConfig, TransferState};

const KEY: &[u8] = b"integration-agent-token";
const CP: u64 = 256 * 1024;

struct Server {
    addr: SocketAddr,
    state: TransferState,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    async fn start(f: impl FnOnce(&mut TransferConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Server::start_in(dir, Path::new("data").to_owned(), f).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        sub: PathBuf,
        f: impl FnOnce(&mut TransferConfig),
    ) -> Server {
        let mut config = TransferConfig {
            enabled: true,
            checkpoint_bytes: CP,
            dir: sub,
            ..TransferConfig::default()
        };
        f(&mut config);
        let state = TransferState::new(&config, dir.path(), KEY).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(transfer::serve_on(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            state,
            dir,
            stop: Some(stop),
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn url(&self, id: &str) -> String {
        format!("{}/v1/files/{id}", self.base())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn tok(id: &str, d: Direction) -> String {
    token::sign(KEY, id, d, SystemTime::now() + Duration::from_secs(600)).unwrap()
}

/// A file of `n` pseudo-random bytes (xorshift, so chunks differ).
fn make_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ n as u64;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    let p = dir.join(name);
    std::fs::write(&p, v).unwrap();
    p
}

fn meta(digest: &str) -> String {
    format!("blake3 {}", STANDARD.encode(digest))
}

async fn create(s: &Server, id: &str, size: u64, digest: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/files", s.base()))
        .bearer_auth(tok(id, Direction::Upload))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", size)
        .header("Upload-Metadata", meta(digest))
        .send()
        .await
        .unwrap()
}

async fn head_offset(s: &Server, id: &str) -> u64 {
    let r = reqwest::Client::new()
        .head(s.url(id))
        .bearer_auth(tok(id, Direction::Upload))
        .header("Tus-Resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "HEAD {id}");
    r.headers()["upload-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn fetch(s: &Server, id: &str) -> (u16, Vec<u8>) {
    let r = reqwest::Client::new()
        .get(s.url(id))
        .bearer_auth(tok(id, Direction::Download))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Sends a PATCH whose body stops after `send` of its declared `len`
/// bytes, then drops the connection (a killed sender).
fn cut_patch(addr: SocketAddr, id: &str, offset: u64, data: &[u8], len: u64) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "PATCH /v1/files/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTus-Resumable: 1.0.0\r\n\
         Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {len}\r\n\r\n",
        tok(id, Direction::Upload)
    )
    .unwrap();
    c.write_all(data).unwrap();
    c.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c.shutdown(std::net::Shutdown::Both).unwrap();
}

/// Polls the upload's offset until it is `want` (the server notices the
/// cut connection asynchronously).
async fn wait_offset(s: &Server, id: &str, want: u64) {
    let mut last = u64::MAX;
    for _ in 0..100 {
        last = head_offset(s, id).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("upload {id} stayed at offset {last}, expected {want}");
}

/// A TCP proxy to `upstream` that cuts every connection (both ways) once
/// `limit` bytes went in the direction `up` (client → server) or down:
/// a connection killed mid-transfer, at a byte count the test chooses.
async fn cut_proxy(upstream: SocketAddr, up: bool, limit: u64) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((c, _)) = l.accept().await else { return };
            let Ok(s) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let (cr, cw) = c.into_split();
            let (sr, sw) = s.into_split();
            let pump = |mut r: tokio::net::tcp::OwnedReadHalf,
                        mut w: tokio::net::tcp::OwnedWriteHalf,
                        limit: u64| async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut left = limit;
                while left > 0 {
                    let n = match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(left as usize),
                    };
                    if w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    left -= n as u64;
                }
            };
            let (lu, ld) = if up {
                (limit, u64::MAX)
            } else {
                (u64::MAX, limit)
            };
            tokio::spawn(async move {
                // Whichever direction ends first takes the other down.
                tokio::select! {
                    _ = pump(cr, sw, lu) => {}
                    _ = pump(sr, cw, ld) => {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_resumes_after_a_killed_connection() {
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "up.bin", (10 * CP + 1234) as usize);
    let bytes = std::fs::read(&src).unwrap();
    let digest = hash_file(&src).unwrap();
    assert_eq!(
        create(&s, "up1", bytes.len() as u64, &digest)
            .await
            .status(),
        201
    );
    // The sender dies 2.5 checkpoints into its body: the server keeps the
    // two whole checkpoints and nothing of the half chunk.
    let cut = (2 * CP + CP / 2) as usize;
    let addr = s.addr;
    let b = bytes.clone();
    tokio::task::spawn_blocking(move || cut_patch(addr, "up1", 0, &b[..cut], b.len() as u64))
        .await
        .unwrap();
    wait_offset(&s, "up1", 2 * CP).await;
    let partial = s.state.store().partial_path("up1").unwrap();
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 2 * CP);

    // The journaled client resumes from the server's checkpoint (after
    // checking it against its own file) and finishes.
    let jdir = tempfile::tempdir().unwrap();
    let opts = UploadOptions {
        checkpoint_bytes: CP,
        sent: Arc::default(),
        digests: None,
    };
    let http = reqwest::Client::new();
    let token = tok("up1", Direction::Upload);
    let rep = client::upload(&http, &s.base(), &token, "up1", &src, jdir.path(), &opts)
        .await
        .unwrap();
    assert_eq!(rep.resumed_at, 2 * CP);
    assert_eq!(rep.sent, bytes.len() as u64 - 2 * CP);
    let (status, got) = fetch(&s, "up1").await;
    assert_eq!(status, 200);
    assert!(got == bytes, "downloaded bytes differ from the source");

    // A second upload through the client, its connection killed half-way
    // (a proxy cuts it after half the body), then resumed by the same
    // client and journal.
    let size = 40 * CP;
    let src2 = make_file(s.dir.path(), "up2.bin", size as usize);
    let proxy = cut_proxy(s.addr, true, size / 2).await;
    let opts = UploadOptions {
        checkpoint_bytes: CP,
        sent: Arc::new(AtomicU64::new(0)),
        digests: None,
    };
    let token = tok("up2", Direction::Upload);
    let fresh = reqwest::Client::new();
    let e = client::upload(
        &fresh,
        &format!("http://{proxy}"),
        &token,
        "up2",
        &src2,
        jdir.path(),
        &opts,
    )
    .await
    .unwrap_err();
    eprintln!("first attempt: {e}");
    let first = opts.sent.load(Ordering::Relaxed);
    // The server received at most size/2 bytes (headers included) and went
    // back to its last checkpoint: less than one checkpoint is lost.
    let mut offset = head_offset(&s, "up2").await;
    for _ in 0..100 {
        let partial = s.state.store().partial_path("up2").unwrap();
        if std::fs::metadata(&partial).map(|m| m.len()).ok() == Some(offset) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        offset = head_offset(&s, "up2").await;
    }
    assert_eq!(offset % CP, 0, "resume point {offset} is a checkpoint");
    assert!(
        offset > size / 2 - CP - 4096,
        "lost more than a checkpoint: {offset}"
    );
    assert!(offset < size / 2);
    let rep = client::upload(&http, &s.base(), &token, "up2", &src2, jdir.path(), &opts)
        .await
        .unwrap();
    assert_eq!(rep.resumed_at, offset);
    assert_eq!(rep.sent, size - offset);
    eprintln!("sender handed {first} bytes to the first connection; resumed at {offset}");
    let (_, got) = fetch(&s, "up2").await;
    assert!(got == std::fs::read(&src2).unwrap());
    // The client's journal holds every checkpoint and says complete.
    let j = sparegrid_agent::transfer::journal::Journal::open(&jdir.path().join("up2.up")).unwrap();
    assert!(j.state().complete);
    assert_eq!(j.state().checkpoints.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_resumes_after_a_killed_connection() {
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "dl.bin", (64 * CP + 99) as usize);
    let http = reqwest::Client::new();
    client::upload(
        &http,
        &s.base(),
        &tok("dl1", Direction::Upload),
        "dl1",
        &src,
        s.dir.path(),
        &UploadOptions {
            checkpoint_bytes: CP,
            sent: Arc::default(),
            digests: None,
        },
    )
    .await
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("dl.bin");
    let size = 64 * CP + 99;
    // The connection dies after half the file (response headers included).
    let proxy = cut_proxy(s.addr, false, size / 2).await;
    let received = Arc::new(AtomicU64::new(0));
    let e = client::download(
        &reqwest::Client::new(),
        &format!("http://{proxy}/v1/files/dl1"),
        &tok("dl1", Direction::Download),
        &dest,
        CP,
        received.clone(),
    )
    .await
    .unwrap_err();
    eprintln!("first attempt: {e}");
    assert!(!dest.exists(), "an interrupted download is not in place");
    let got_first = received.load(Ordering::Relaxed);
    assert!(
        got_first < size / 2 && got_first > size / 2 - 4096,
        "{got_first}"
    );
    let rep = client::download(
        &http,
        &s.url("dl1"),
        &tok("dl1", Direction::Download),
        &dest,
        CP,
        Arc::default(),
    )
    .await
    .unwrap();
    assert!(rep.resumed_at > 0, "resumed from a checkpoint: {rep:?}");
    assert_eq!(rep.resumed_at % CP, 0);
    assert!(
        got_first - rep.resumed_at <= CP,
        "received twice: {}",
        got_first - rep.resumed_at
    );
    assert_eq!(rep.received, size - rep.resumed_at);
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&src).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_resumes_a_download() {
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "c.bin", (3 * CP + 5) as usize);
    let bytes = std::fs::read(&src).unwrap();
    client::upload(
        &reqwest::Client::new(),
        &s.base(),
        &tok("curl1", Direction::Upload),
        "curl1",
        &src,
        s.dir.path(),
        &UploadOptions::default(),
    )
    .await
    .unwrap();
    // What an earlier, broken curl left behind.
    let out = s.dir.path().join("curl-out.bin");
    std::fs::write(&out, &bytes[..400_000]).unwrap();
    let auth = format!(
        "Authorization: Bearer {}",
        tok("curl1", Direction::Download)
    );
    let url = s.url("curl1");
    let o = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            Command::new("curl")
                .args(["-sS", "-C", "-", "-H", &auth, "-o"])
                .arg(&out)
                .args(["-w", "%{http_code} %{size_download}", &url])
                .output()
                .expect("curl is installed (make deps)")
        }
    })
    .await
    .unwrap();
    assert!(
        o.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let w = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(w, format!("206 {}", bytes.len() - 400_000), "curl -w");
    assert!(std::fs::read(&out).unwrap() == bytes, "curl's file differs");
    // Again on the complete file: curl asks past the end, gets 416, keeps it.
    let auth = format!(
        "Authorization: Bearer {}",
        tok("curl1", Direction::Download)
    );
    let o = Command::new("curl")
        .args(["-sS", "-C", "-", "-H", &auth, "-o"])
        .arg(&out)
        .args(["-w", "%{http_code}", &s.url("curl1")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "416");
    assert!(std::fs::read(&out).unwrap() == bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunk_is_rejected_and_resent() {
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "k.bin", (2 * CP) as usize);
    let bytes = std::fs::read(&src).unwrap();
    assert_eq!(
        create(&s, "k1", bytes.len() as u64, &hash_file(&src).unwrap())
            .await
            .status(),
        201
    );
    let http = reqwest::Client::new();
    let patch = |body: Vec<u8>, offset: u64, sum: Vec<u8>| {
        http.patch(s.url("k1"))
            .bearer_auth(tok("k1", Direction::Upload))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", offset)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Checksum", format!("sha1 {}", STANDARD.encode(sum)))
            .body(body)
            .send()
    };
    let first = &bytes[..CP as usize + 100];
    let sum = sha1::Sha1::digest(first).to_vec();
    let mut corrupted = first.to_vec();
    corrupted[CP as usize + 7] ^= 0x01;
    let r = patch(corrupted, 0, sum.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 460);
    assert_eq!(head_offset(&s, "k1").await, 0, "nothing appended");
    let r = patch(first.to_vec(), 0, sum).await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(head_offset(&s, "k1").await, CP + 100);
    let rest = &bytes[CP as usize + 100..];
    let r = patch(rest.to_vec(), CP + 100, sha1::Sha1::digest(rest).to_vec())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert!(fetch(&s, "k1").await.1 == bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_mismatch_at_the_end_leaves_the_file_invisible() {
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "m.bin", (CP + 10) as usize);
    let bytes = std::fs::read(&src).unwrap();
    let wrong = blake3::hash(b"not this file").to_hex().to_string();
    assert_eq!(
        create(&s, "m1", bytes.len() as u64, &wrong).await.status(),
        201
    );
    let r = reqwest::Client::new()
        .patch(s.url("m1"))
        .bearer_auth(tok("m1", Direction::Upload))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", 0)
        .header("Content-Type", "application/offset+octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 460);
    let body = r.text().await.unwrap();
    assert!(body.contains("digest_mismatch"), "{body}");
    assert_eq!(fetch(&s, "m1").await.0, 404);
    let data = s.dir.path().join("data");
    for sub in ["complete", "partial", "journal"] {
        let n = std::fs::read_dir(data.join(sub)).unwrap().count();
        assert_eq!(n, 0, "{sub}/ is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_oversize_attempts() {
    let s = Server::start(|c| c.max_upload_bytes = 4 * CP).await;
    // A secret next to the data directory and a symlink to it inside.
    let secret = s.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let complete = s.dir.path().join("data/complete");
    std::os::unix::fs::symlink(&secret, complete.join("planted")).unwrap();
    let auth = format!(
        "Authorization: Bearer {}",
        tok("planted", Direction::Download)
    );
    let base = s.base();
    for path in [
        "/v1/files/../../secret.txt",
        "/v1/files/..%2f..%2fsecret.txt",
        "/v1/files/%2e%2e",
        "/v1/files//etc/passwd",
        "/v1/files/planted",
        "/v1/files/a.b",
        "/v1/files/%2Fetc%2Fpasswd",
    ] {
        let o = Command::new("curl")
            .args(["-sS", "--path-as-is", "-H", &auth, "-w", "\n%{http_code}"])
            .arg(format!("{base}{path}"))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(out.ends_with("\n400"), "{path}: {out}");
        assert!(!out.contains("top secret"), "{path} leaked the file");
    }
    // Oversize: declared above max_upload_bytes, or more than declared.
    let digest = blake3::hash(b"x").to_hex().to_string();
    assert_eq!(create(&s, "big", 4 * CP + 1, &digest).await.status(), 413);
    assert_eq!(create(&s, "o1", 1000, &digest).await.status(), 201);
    let r = reqwest::Client::new()
        .patch(s.url("o1"))
        .bearer_auth(tok("o1", Direction::Upload))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", 0)
        .header("Content-Type", "application/offset+octet-stream")
        .body(vec![0u8; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(head_offset(&s, "o1").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_wrong_scope_tokens() {
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "t.bin", 5000);
    client::upload(
        &reqwest::Client::new(),
        &s.base(),
        &tok("t1", Direction::Upload),
        "t1",
        &src,
        s.dir.path(),
        &UploadOptions::default(),
    )
    .await
    .unwrap();
    let get = |auth: Option<String>| {
        let mut r = reqwest::Client::new().get(s.url("t1"));
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        r.send()
    };
    let now = SystemTime::now();
    let expired =
        token::sign(KEY, "t1", Direction::Download, now - Duration::from_secs(5)).unwrap();
    let other_key = token::sign(
        b"another agent",
        "t1",
        Direction::Download,
        now + Duration::from_secs(60),
    )
    .unwrap();
    let cases = [
        (None, 401),
        (Some(expired), 401),
        (Some(other_key), 401),
        (Some(tok("t2", Direction::Download)), 403),
        (Some(tok("t1", Direction::Upload)), 403),
        (Some(tok("t1", Direction::Download)), 200),
    ];
    for (auth, want) in cases {
        let r = get(auth.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{auth:?}");
    }
    // A download token cannot create an upload.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/files", s.base()))
        .bearer_auth(tok("t9", Direction::Download))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", 10)
        .header("Upload-Metadata", meta(&"0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// `root_`: a 1 MiB tmpfs as the data directory; a 4 MiB upload fills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_disk_full_gets_507_and_nothing_half_written() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: root_disk_full needs root to mount a tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "sparegrid-test"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let s = Server::start_in(dir, mnt.clone(), |c| c.checkpoint_bytes = 64 * 1024).await;
    let size = 4 * 1024 * 1024u64;
    let src = make_file(s.dir.path(), "full.bin", size as usize);
    let bytes = std::fs::read(&src).unwrap();
    assert_eq!(
        create(&s, "full", size, &hash_file(&src).unwrap())
            .await
            .status(),
        201
    );
    let r = reqwest::Client::new()
        .patch(s.url("full"))
        .bearer_auth(tok("full", Direction::Upload))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", 0)
        .header("Content-Type", "application/offset+octet-stream")
        .body(bytes)
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 507),
        // The server may answer before reading the whole body and close.
        Err(e) => panic!("no 507 answer: {e}"),
    }
    let offset = head_offset(&s, "full").await;
    assert_eq!(offset % (64 * 1024), 0, "back to a checkpoint: {offset}");
    assert!(offset < size);
    let len = std::fs::metadata(s.state.store().partial_path("full").unwrap())
        .unwrap()
        .len();
    assert_eq!(len, offset, "the partial chunk was truncated");
    assert_eq!(fetch(&s, "full").await.0, 404);
}

/// A standard tus client, unchanged: `tuspy` (PyPI) uploads with its own
/// chunking and sha1 checksums; the result downloads intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_tus_client_tuspy() {
    let Some(python) = std::env::var_os("SPAREGRID_TUSPY") else {
        eprintln!("skipped: set SPAREGRID_TUSPY to a python with tuspy (make tus-venv)");
        return;
    };
    let s = Server::start(|_| {}).await;
    let src = make_file(s.dir.path(), "py.bin", (5 * CP + 321) as usize);
    let digest = hash_file(&src).unwrap();
    let script = r#"
import sys
from tusclient import client
base, token, path, digest = sys.argv[1:5]
c = client.TusClient(base + "/v1/files", headers={"Authorization": "Bearer " + token})
u = c.uploader(path, chunk_size=300000, metadata={"blake3": digest}, upload_checksum=True)
u.upload()
print(u.url)
"#;
    let o = {
        let (python, base, token, src) = (
            python.clone(),
            s.base(),
            tok("py1", Direction::Upload),
            src.clone(),
        );
        tokio::task::spawn_blocking(move || {
            Command::new(python)
                .arg("-c")
                .arg(script)
                .arg(base)
                .arg(token)
                .arg(src)
                .arg(digest)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(
        o.status.success(),
        "tuspy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), s.url("py1"));
    assert!(fetch(&s, "py1").await.1 == std::fs::read(&src).unwrap());
}

/// The agent daemon itself serves the endpoint when `[transfer] enabled`:
/// a real `sparegrid-agent` process (process runtime, no VMs; root for its
/// cgroup partition) takes an upload with the agent's client on
/// `transfer.listen`, and `curl` downloads the same bytes back.
#[test]
fn root_agent_daemon_serves_the_transfer_endpoint() {
    const T: &str = "root_agent_daemon_serves_the_transfer_endpoint";
    if sparegrid_tests::skip_unless_root(T) {
        return;
    }
    use sparegrid_tests::{free_port, unique, Harness};
    let mut h = Harness::new();
    let partition = unique("sparegrid-transfer");
    h.cleanup_partition_on_drop(
        Path::new(sparegrid_tests::controller::CGROUP_ROOT),
        &partition,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent_token = "daemon-transfer-token";
    let mut c = h.base_conf();
    c.str("agent", "host_name", &unique("sgx"))
        .str("runtime", "kind", "process")
        .str("cgroup", "partition", &partition)
        .set("policy", "max_grid_vms", 0)
        .str("controller", "token", agent_token)
        .set("transfer", "enabled", true)
        .str("transfer", "listen", &addr.to_string());
    let agent = h.start(&c);

    let src = h.dir().join("payload.bin");
    let bytes: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(&src, &bytes).unwrap();
    let id = "daemon-up";
    let expires = SystemTime::now() + Duration::from_secs(300);
    let up = token::sign(agent_token.as_bytes(), id, Direction::Upload, expires).unwrap();
    let down = token::sign(agent_token.as_bytes(), id, Direction::Download, expires).unwrap();
    let base = format!("http://{addr}");
    let journals = h.subdir("client-journals");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rep = rt
        .block_on(client::upload(
            &reqwest::Client::new(),
            &base,
            &up,
            id,
            &src,
            &journals,
            &UploadOptions::default(),
        ))
        .unwrap_or_else(|e| panic!("upload to the agent: {e}\n{}", agent.log_tail(40)));
    assert_eq!(rep.sent, bytes.len() as u64);
    let out = h.dir().join("fetched.bin");
    let st = Command::new("curl")
        .args(["-sSf", "-o"])
        .arg(&out)
        .arg("-H")
        .arg(format!("Authorization: Bearer {down}"))
        .arg(format!("{base}{}/{id}", transfer::FILES))
        .status()
        .unwrap();
    assert!(st.success(), "curl download failed\n{}", agent.log_tail(40));
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "downloaded bytes differ"
    );
    // Without a token: refused.
    let code = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{base}{}/{id}", transfer::FILES))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout), "401");
    // The agent's /metrics counts what happened.
    let metrics = agent.metrics();
    for needle in [
        format!("sparegrid_transfer_received_bytes_total {}", bytes.len()),
        format!("sparegrid_transfer_sent_bytes_total {}", bytes.len()),
        "sparegrid_transfer_published_total 1".to_owned(),
        "sparegrid_transfer_requests_total{op=\"download\",status=\"401\"} 1".to_owned(),
        "sparegrid_transfer_requests_total{op=\"download\",status=\"200\"} 1".to_owned(),
    ] {
        assert!(metrics.contains(&needle), "missing {needle} in\n{metrics}");
    }
    drop(agent);
}
