//! Router-level tests of the transfer endpoint (no socket): tus routes,
//! downloads, tokens, traversal and size limits.

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http_body_util::BodyExt;
use sha1::Digest as _;
use tower::ServiceExt;

use super::journal::Header;
use super::*;

const KEY: &[u8] = b"agent-token-for-tests";

struct Env {
    _dir: tempfile::TempDir,
    state: TransferState,
    app: Router,
}

fn env_with(f: impl FnOnce(&mut TransferConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut config = TransferConfig {
        checkpoint_bytes: 64 * 1024,
        ..TransferConfig::default()
    };
    f(&mut config);
    let state = TransferState::new(&config, dir.path(), KEY).unwrap();
    let app = router(state.clone());
    Env {
        _dir: dir,
        state,
        app,
    }
}

fn env() -> Env {
    env_with(|_| {})
}

fn tok(id: &str, d: Direction) -> String {
    token::sign(KEY, id, d, SystemTime::now() + Duration::from_secs(600)).unwrap()
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 253) as u8).collect()
}

fn meta_for(d: &[u8]) -> String {
    format!(
        "blake3 {},filename {}",
        STANDARD.encode(blake3::hash(d).to_hex().as_str()),
        STANDARD.encode("x.bin")
    )
}

async fn send(app: &Router, r: Request<Body>) -> Response {
    app.clone().oneshot(r).await.unwrap()
}

async fn body_of(r: Response) -> Vec<u8> {
    r.into_body().collect().await.unwrap().to_bytes().to_vec()
}

fn h<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
        .to_str()
        .unwrap()
}

fn create_req(id: &str, d: &[u8]) -> Request<Body> {
    Request::post(FILES)
        .header(
            "Authorization",
            format!("Bearer {}", tok(id, Direction::Upload)),
        )
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", d.len())
        .header("Upload-Metadata", meta_for(d))
        .body(Body::empty())
        .unwrap()
}

fn patch_req(id: &str, offset: u64) -> axum::http::request::Builder {
    Request::patch(format!("{FILES}/{id}"))
        .header(
            "Authorization",
            format!("Bearer {}", tok(id, Direction::Upload)),
        )
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", offset)
        .header("Content-Type", "application/offset+octet-stream")
}

fn head_req(id: &str) -> Request<Body> {
    Request::head(format!("{FILES}/{id}"))
        .header(
            "Authorization",
            format!("Bearer {}", tok(id, Direction::Upload)),
        )
        .header("Tus-Resumable", "1.0.0")
        .body(Body::empty())
        .unwrap()
}

fn get_req(id: &str) -> axum::http::request::Builder {
    Request::get(format!("{FILES}/{id}")).header(
        "Authorization",
        format!("Bearer {}", tok(id, Direction::Download)),
    )
}

async fn upload_all(e: &Env, id: &str, d: &[u8]) {
    let r = send(&e.app, create_req(id, d)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = send(
        &e.app,
        patch_req(id, 0).body(Body::from(d.to_vec())).unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{:?}", body_of(r).await);
}

#[tokio::test]
async fn options_advertises_version_extensions_and_limits() {
    let e = env_with(|c| c.max_upload_bytes = 12345);
    let r = send(&e.app, Request::options(FILES).body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = send(
        &e.app,
        Request::options(FILES)
            .header(
                "Authorization",
                format!("Bearer {}", tok("any", Direction::Download)),
            )
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(h(&r, "tus-version"), "1.0.0");
    assert_eq!(h(&r, "tus-max-size"), "12345");
    for ext in [
        "creation",
        "creation-with-upload",
        "checksum",
        "termination",
        "expiration",
    ] {
        assert!(h(&r, "tus-extension").split(',').any(|x| x == ext), "{ext}");
    }
    assert!(h(&r, "tus-checksum-algorithm")
        .split(',')
        .any(|x| x == "sha1"));
}

#[tokio::test]
async fn upload_in_two_patches_then_download_with_ranges() {
    let e = env();
    let d = data(200_000);
    let r = send(&e.app, create_req("f1", &d)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(h(&r, "location"), "/v1/files/f1");
    assert_eq!(h(&r, "tus-resumable"), "1.0.0");
    assert!(httpdate::parse_http_date(h(&r, "upload-expires")).unwrap() > SystemTime::now());
    // Not downloadable while partial.
    let r = send(&e.app, get_req("f1").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = send(
        &e.app,
        patch_req("f1", 0)
            .body(Body::from(d[..70_000].to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(h(&r, "upload-offset"), "70000");
    let r = send(&e.app, head_req("f1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h(&r, "upload-offset"), "70000");
    assert_eq!(h(&r, "upload-length"), "200000");
    assert_eq!(h(&r, "cache-control"), "no-store");
    let cp = h(&r, "sparegrid-checkpoint").to_owned();
    assert_eq!(
        cp,
        format!("65536 {}", crate::tree::digest_of(0, &d[..65536]))
    );
    // A PATCH at a stale offset: 409, nothing changes.
    let r = send(
        &e.app,
        patch_req("f1", 0)
            .body(Body::from(d[..10].to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = send(
        &e.app,
        patch_req("f1", 70_000)
            .body(Body::from(d[70_000..].to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(h(&r, "upload-offset"), "200000");
    assert!(r.headers().get("upload-expires").is_none());

    let r = send(&e.app, get_req("f1").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tag = h(&r, "etag").to_owned();
    assert_eq!(tag, format!("\"b3-{}\"", blake3::hash(&d).to_hex()));
    assert_eq!(h(&r, "accept-ranges"), "bytes");
    assert_eq!(body_of(r).await, d);
    let r = send(
        &e.app,
        get_req("f1")
            .header("Range", "bytes=150000-")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(h(&r, "content-range"), "bytes 150000-199999/200000");
    assert_eq!(body_of(r).await, &d[150_000..]);
    // If-Range with our tag: the range applies; with another: whole file.
    let r = send(
        &e.app,
        get_req("f1")
            .header("Range", "bytes=10-19")
            .header("If-Range", &tag)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(body_of(r).await, &d[10..20]);
    let r = send(
        &e.app,
        get_req("f1")
            .header("Range", "bytes=10-19")
            .header("If-Range", "\"b3-other\"")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body_of(r).await.len(), d.len());
    let r = send(
        &e.app,
        get_req("f1")
            .header("Range", "bytes=200000-")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(h(&r, "content-range"), "bytes */200000");
    // tus HEAD of a finished upload reports it whole.
    let r = send(&e.app, head_req("f1")).await;
    assert_eq!(h(&r, "upload-offset"), "200000");
}

#[tokio::test]
async fn creation_with_upload() {
    let e = env();
    let d = data(5000);
    let r = send(
        &e.app,
        Request::post(FILES)
            .header(
                "Authorization",
                format!("Bearer {}", tok("cwu", Direction::Upload)),
            )
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", d.len())
            .header("Upload-Metadata", meta_for(&d))
            .header("Content-Type", "application/offset+octet-stream")
            .body(Body::from(d[..3000].to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(h(&r, "upload-offset"), "3000");
    let r = send(
        &e.app,
        patch_req("cwu", 3000)
            .body(Body::from(d[3000..].to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(e.state.store().is_complete("cwu").unwrap());
}

#[tokio::test]
async fn protocol_errors() {
    let e = env();
    let d = data(1000);
    let r = send(&e.app, create_req("p1", &d)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // Creating it again: 409.
    let r = send(&e.app, create_req("p1", &d)).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    // Version mismatch: 412 with Tus-Version.
    let r = send(
        &e.app,
        Request::head("/v1/files/p1")
            .header(
                "Authorization",
                format!("Bearer {}", tok("p1", Direction::Upload)),
            )
            .header("Tus-Resumable", "0.2.2")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(h(&r, "tus-version"), "1.0.0");
    // Wrong content type: 415.
    let r = send(
        &e.app,
        Request::patch("/v1/files/p1")
            .header(
                "Authorization",
                format!("Bearer {}", tok("p1", Direction::Upload)),
            )
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", 0)
            .header("Content-Type", "text/plain")
            .body(Body::from("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Missing digest in metadata: 400 naming the key.
    let r = send(
        &e.app,
        Request::post(FILES)
            .header(
                "Authorization",
                format!("Bearer {}", tok("p2", Direction::Upload)),
            )
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", 10)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body_of(r).await).contains("blake3"));
    // Unknown checksum algorithm: 400.
    let r = send(
        &e.app,
        patch_req("p1", 0)
            .header("Upload-Checksum", "md5 AAAA")
            .body(Body::from("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn corrupted_chunk_is_rejected_with_460_and_resent() {
    let e = env();
    let d = data(150_000);
    send(&e.app, create_req("c1", &d)).await;
    for algo in ["sha1", "sha256", "blake3"] {
        let mut hasher = store::BodyHasher::for_algorithm(algo).unwrap();
        hasher.update(&d);
        let sum = STANDARD.encode(hasher.finalize());
        let mut bad = d.clone();
        bad[100_000] ^= 0x40;
        let r = send(
            &e.app,
            patch_req("c1", 0)
                .header("Upload-Checksum", format!("{algo} {sum}"))
                .body(Body::from(bad))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status().as_u16(), 460, "{algo}");
        let r = send(&e.app, head_req("c1")).await;
        assert_eq!(h(&r, "upload-offset"), "0", "{algo}: nothing appended");
    }
    let sum = STANDARD.encode(sha1::Sha1::digest(&d));
    let r = send(
        &e.app,
        patch_req("c1", 0)
            .header("Upload-Checksum", format!("sha1 {sum}"))
            .body(Body::from(d.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = send(&e.app, get_req("c1").body(Body::empty()).unwrap()).await;
    assert_eq!(body_of(r).await, d);
}

#[tokio::test]
async fn digest_mismatch_at_the_end_leaves_nothing_visible() {
    let e = env();
    let d = data(10_000);
    let other = data(9_999);
    let r = send(
        &e.app,
        Request::post(FILES)
            .header(
                "Authorization",
                format!("Bearer {}", tok("dm", Direction::Upload)),
            )
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", d.len())
            .header("Upload-Metadata", meta_for(&other))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = send(
        &e.app,
        patch_req("dm", 0).body(Body::from(d.clone())).unwrap(),
    )
    .await;
    assert_eq!(r.status().as_u16(), 460);
    assert!(String::from_utf8_lossy(&body_of(r).await).contains("digest_mismatch"));
    let r = send(&e.app, get_req("dm").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(!e.state.store().complete_path("dm").unwrap().exists());
    let r = send(&e.app, head_req("dm")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn oversize_uploads_get_413() {
    let e = env_with(|c| c.max_upload_bytes = 100_000);
    let r = send(&e.app, create_req("big", &data(100_001))).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let d = data(1000);
    send(&e.app, create_req("o1", &d)).await;
    // Declared by Content-Length.
    let r = send(
        &e.app,
        patch_req("o1", 0).body(Body::from(data(1001))).unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Streamed without a length: found while writing, cut back.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(data(600)), Ok(data(600))];
    let r = send(
        &e.app,
        patch_req("o1", 0)
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = send(&e.app, head_req("o1")).await;
    assert_eq!(h(&r, "upload-offset"), "0");
    let len = std::fs::metadata(e.state.store().partial_path("o1").unwrap())
        .unwrap()
        .len();
    assert_eq!(len, 0, "nothing half-written kept");
}

#[tokio::test]
async fn a_body_that_breaks_off_goes_back_to_the_last_checkpoint() {
    let e = env();
    let d = data(200_000);
    send(&e.app, create_req("br", &d)).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(d[..100_000].to_vec()),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "cut",
        )),
    ];
    let r = send(
        &e.app,
        patch_req("br", 0)
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .unwrap(),
    )
    .await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let r = send(&e.app, head_req("br")).await;
    assert_eq!(h(&r, "upload-offset"), "65536", "the last checkpoint");
    let r = send(
        &e.app,
        patch_req("br", 65536)
            .body(Body::from(d[65536..].to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = send(&e.app, get_req("br").body(Body::empty()).unwrap()).await;
    assert_eq!(body_of(r).await, d);
}

#[tokio::test]
async fn tokens_are_required_and_scoped() {
    let e = env();
    let d = data(100);
    upload_all(&e, "t1", &d).await;
    let get = |auth: Option<String>| {
        let mut b = Request::get("/v1/files/t1");
        if let Some(a) = auth {
            b = b.header("Authorization", a);
        }
        b.body(Body::empty()).unwrap()
    };
    assert_eq!(
        send(&e.app, get(None)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&e.app, get(Some("Bearer junk".into()))).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let forged = token::sign(
        b"other key",
        "t1",
        Direction::Download,
        SystemTime::now() + Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        send(&e.app, get(Some(format!("Bearer {forged}"))))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let expired = token::sign(
        KEY,
        "t1",
        Direction::Download,
        SystemTime::now() - Duration::from_secs(1),
    )
    .unwrap();
    assert_eq!(
        send(&e.app, get(Some(format!("Bearer {expired}"))))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let other_id = tok("t2", Direction::Download);
    assert_eq!(
        send(&e.app, get(Some(format!("Bearer {other_id}"))))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let upload_dir = tok("t1", Direction::Upload);
    assert_eq!(
        send(&e.app, get(Some(format!("Bearer {upload_dir}"))))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    // A download token cannot create or delete.
    let r = send(
        &e.app,
        Request::delete("/v1/files/t1")
            .header(
                "Authorization",
                format!("Bearer {}", tok("t1", Direction::Download)),
            )
            .header("Tus-Resumable", "1.0.0")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let ok = tok("t1", Direction::Download);
    assert_eq!(
        send(&e.app, get(Some(format!("Bearer {ok}"))))
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn traversal_attempts_get_400() {
    let e = env();
    for path in [
        "/v1/files/..",
        "/v1/files/../etc/passwd",
        "/v1/files/%2e%2e",
        "/v1/files/..%2fetc%2fpasswd",
        "/v1/files//etc/passwd",
        "/v1/files/a.b",
        "/v1/files/a%00",
        "/v1/files/.",
        "/v1/files/a\\b",
    ] {
        let Ok(req) = Request::get(path)
            .header(
                "Authorization",
                format!("Bearer {}", tok("a", Direction::Download)),
            )
            .body(Body::empty())
        else {
            continue; // not even a valid URI
        };
        let r = send(&e.app, req).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
    }
    // A symlink planted in the data directory is not followed.
    let outside = e.state.store().root().join("..").join("outside-secret");
    std::fs::write(&outside, b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, e.state.store().complete_path("planted").unwrap())
        .unwrap();
    let r = send(&e.app, get_req("planted").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(!String::from_utf8_lossy(&body_of(r).await).contains("secret\""));
}

#[tokio::test]
async fn termination_and_expiration() {
    let e = env();
    let d = data(100);
    send(&e.app, create_req("del", &d)).await;
    let del = |id: &str| {
        Request::delete(format!("/v1/files/{id}"))
            .header(
                "Authorization",
                format!("Bearer {}", tok(id, Direction::Upload)),
            )
            .header("Tus-Resumable", "1.0.0")
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        send(&e.app, del("del")).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        send(&e.app, head_req("del")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&e.app, del("del")).await.status(),
        StatusCode::NOT_FOUND
    );
    // An upload past its expiry: 410 and removed; the sweeper removes others.
    for id in ["exp1", "exp2"] {
        e.state
            .store()
            .create(Header {
                id: id.into(),
                source: "t".into(),
                target: "t".into(),
                size: 10,
                digest: "0".repeat(64),
                checkpoint_bytes: 0,
                created_unix: 1,
                expires_unix: 2,
                metadata: String::new(),
            })
            .unwrap();
    }
    assert_eq!(
        send(&e.app, head_req("exp1")).await.status(),
        StatusCode::GONE
    );
    assert!(!e.state.store().journal_path("exp1").unwrap().exists());
    assert_eq!(e.state.sweep_expired().await, vec!["exp2".to_owned()]);
    assert_eq!(
        send(&e.app, head_req("exp2")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn state_needs_a_key_and_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        TransferState::new(&TransferConfig::default(), dir.path(), b""),
        Err(TransferError::NoKey)
    ));
    let bad = TransferConfig {
        checkpoint_bytes: 1,
        ..TransferConfig::default()
    };
    let e = TransferState::new(&bad, dir.path(), KEY).err().unwrap();
    assert!(e.to_string().contains("transfer.checkpoint_bytes"), "{e}");
}

#[tokio::test]
async fn an_empty_upload_completes_at_creation() {
    let e = env();
    let r = send(&e.app, create_req("empty", b"")).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(h(&r, "upload-offset"), "0");
    let r = send(&e.app, get_req("empty").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(body_of(r).await.is_empty());
    // Declared as something else: refused, nothing visible.
    let r = send(
        &e.app,
        Request::post(FILES)
            .header(
                "Authorization",
                format!("Bearer {}", tok("empty2", Direction::Upload)),
            )
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", 0)
            .header("Upload-Metadata", meta_for(b"x"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status().as_u16(), 460);
    assert!(!e.state.store().is_complete("empty2").unwrap());
}

/// Shutdown does not wait for a transfer that never ends: after the grace
/// period the server returns, and the stalled upload kept its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_stalled_transfers_after_the_grace() {
    use std::io::Write as _;
    let e = env();
    let d = data(200_000);
    send(&e.app, create_req("stall", &d)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_with_grace(
        listener,
        e.state.clone(),
        async {
            let _ = stopped.await;
        },
        Duration::from_millis(300),
    ));
    let token = tok("stall", Direction::Upload);
    let first = d[..70_000].to_vec();
    let client = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "PATCH /v1/files/stall HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
             Content-Type: application/offset+octet-stream\r\nContent-Length: 200000\r\n\r\n"
        )
        .unwrap();
        c.write_all(&first).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(c);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("the server returns after the grace, not when the client gives up")
        .unwrap()
        .unwrap();
    // The cut upload went back to its checkpoint.
    let mut offset = String::new();
    for _ in 0..50 {
        let r = send(&e.app, head_req("stall")).await;
        offset = h(&r, "upload-offset").to_owned();
        if offset == "65536" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(offset, "65536");
    client.join().unwrap();
}

/// With `tls_cert` and `tls_key` the endpoint speaks HTTPS only: a client
/// trusting the certificate uploads (through the agent's client) and
/// downloads; plain HTTP to the port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let config = TransferConfig {
        checkpoint_bytes: 64 * 1024,
        tls_cert: Some(cert.clone()),
        tls_key: Some(key),
        ..TransferConfig::default()
    };
    let state = TransferState::new(&config, dir.path(), KEY).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, state, async {
        let _ = stopped.await;
    }));
    let src = dir.path().join("src.bin");
    let d = data(300_000);
    std::fs::write(&src, &d).unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let rep = client::upload(
        &https,
        &base,
        &tok("tls1", Direction::Upload),
        "tls1",
        &src,
        dir.path(),
        &client::UploadOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(rep.size, d.len() as u64);
    let dest = dir.path().join("out.bin");
    client::download(
        &https,
        &format!("{base}/v1/files/tls1"),
        &tok("tls1", Direction::Download),
        &dest,
        64 * 1024,
        Default::default(),
    )
    .await
    .unwrap();
    assert!(std::fs::read(&dest).unwrap() == d);
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/files/tls1"))
        .bearer_auth(tok("tls1", Direction::Download))
        .send()
        .await;
    if let Ok(r) = &plain {
        assert!(!r.status().is_success(), "{r:?}");
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn counters_follow_answers_and_bytes() {
    let e = env();
    let d = data(200 * 1024);
    upload_all(&e, "counted", &d).await;
    let r = send(&e.app, get_req("counted").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body_of(r).await.len(), d.len());
    // No token: 401, counted under the download operation.
    let r = send(
        &e.app,
        Request::get(format!("{FILES}/counted"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A traversal attempt is refused before routing, and still counted.
    let r = send(
        &e.app,
        Request::get(format!("{FILES}/../etc"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let c = e.state.counters();
    assert_eq!(c.requests.get(&("create", 201)), Some(&1));
    assert_eq!(c.requests.get(&("upload", 204)), Some(&1));
    assert_eq!(c.requests.get(&("download", 200)), Some(&1));
    assert_eq!(c.requests.get(&("download", 401)), Some(&1));
    assert_eq!(c.requests.get(&("download", 400)), Some(&1));
    assert_eq!(c.received_bytes, d.len() as u64);
    assert_eq!(c.discarded_bytes, 0);
    assert_eq!(c.sent_bytes, d.len() as u64);
    assert_eq!(c.published, 1);
}

#[tokio::test]
async fn an_imported_local_file_is_served_whole_and_only_once() {
    let e = env();
    let d = data(200_000);
    let src = e._dir.path().join("local.bin");
    std::fs::write(&src, &d).unwrap();
    e.state.store().import("imp1", &src).unwrap();
    assert!(e.state.store().is_complete("imp1").unwrap());
    let r = send(&e.app, get_req("imp1").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        h(&r, "etag"),
        format!("\"b3-{}\"", blake3::hash(&d).to_hex())
    );
    assert_eq!(body_of(r).await, d);
    // The same id twice is refused; a missing file names its path.
    assert!(matches!(
        e.state.store().import("imp1", &src),
        Err(crate::store::StoreError::Exists { .. })
    ));
    let missing = e._dir.path().join("nope.bin");
    let err = e
        .state
        .store()
        .import("imp2", &missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.bin"), "{err}");
    assert!(!e.state.store().is_complete("imp2").unwrap());
    // With the digest given: the right one publishes, a wrong one leaves
    // nothing behind.
    let store = e.state.store();
    store
        .import_with_digest("imp3", &src, &blake3::hash(&d).to_hex())
        .unwrap();
    assert!(store.is_complete("imp3").unwrap());
    let wrong = blake3::hash(b"other").to_hex();
    assert!(matches!(
        store.import_with_digest("imp4", &src, &wrong),
        Err(crate::store::StoreError::DigestMismatch { .. })
    ));
    assert!(!store.is_complete("imp4").unwrap());
    assert!(!store.journal_path("imp4").unwrap().exists());
    assert!(!store.partial_path("imp4").unwrap().exists());
}

/// Digests the caller computed (`file_digests`, as a migration does for
/// its offer) are used by the uploader instead of a second pass: the
/// upload completes and verifies with them; digests for another chunk
/// length are ignored (hashed again), and digests of other bytes make the
/// upload fail its whole-file check rather than publish wrong data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_uses_the_digests_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let config = TransferConfig {
        checkpoint_bytes: 64 * 1024,
        ..TransferConfig::default()
    };
    let state = TransferState::new(&config, dir.path(), KEY).unwrap();
    let store = state.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, state, async {
        let _ = stopped.await;
    }));
    let d = data(300_000);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &d).unwrap();
    let http = reqwest::Client::new();
    let up = |id: &'static str, digests: client::FileDigests| {
        let (http, base, src, jdir) = (
            http.clone(),
            base.clone(),
            src.clone(),
            dir.path().join("j"),
        );
        async move {
            std::fs::create_dir_all(&jdir).unwrap();
            let opts = client::UploadOptions {
                checkpoint_bytes: 64 * 1024,
                digests: Some(Arc::new(digests)),
                ..Default::default()
            };
            client::upload(
                &http,
                &base,
                &tok(id, Direction::Upload),
                id,
                &src,
                &jdir,
                &opts,
            )
            .await
        }
    };
    let right = client::file_digests(&src, 64 * 1024).unwrap();
    assert_eq!(right.blake3, blake3::hash(&d).to_hex().to_string());
    up("dg1", right).await.unwrap();
    assert!(store.store().is_complete("dg1").unwrap());
    // Another chunk length: not used, the uploader hashes for itself.
    up("dg2", client::file_digests(&src, 128 * 1024).unwrap())
        .await
        .unwrap();
    assert!(store.store().is_complete("dg2").unwrap());
    // Digests of other bytes of the same size: refused at the end.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, &data(300_001)[1..]).unwrap();
    let e = up("dg3", client::file_digests(&other, 64 * 1024).unwrap())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("460") || e.to_string().contains("blake3"),
        "{e}"
    );
    assert!(!store.store().is_complete("dg3").unwrap());
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
