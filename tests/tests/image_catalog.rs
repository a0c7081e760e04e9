//! The image catalog end to end (issue 6): a real controller and real
//! agent processes (process runtime: the image is only checked, not
//! booted). Agent A's workload has its image and serves it on its transfer
//! endpoint; agent B's workload names the same `image_digest` at a
//! directory that does not exist, so B fetches the image from A (the
//! controller says who serves it) before it starts, checks every file, and
//! caches it there.
//!
//! - `a_missing_image_is_fetched_from_a_peer_checked_and_cached`: B comes
//!   up with the image, byte for byte A's; the controller lists A as its
//!   source; A's transfer counters show it served it.
//! - `a_corrupt_source_is_rejected_and_nothing_is_cached`: A's served
//!   kernel is corrupted on disk after publishing; B refuses to start,
//!   saying which file failed, and leaves no image (and no staging
//!   directory) behind.
//! - `an_unknown_image_is_a_clear_error`: nobody serves the digest.
//! - `root_an_image_only_the_controller_serves_is_fetched_from_it`: the
//!   controller serves the image (`[data] images`) and no agent does; the
//!   agent fetches it from the controller's `/v1/data` with the tokens the
//!   controller signed. A controller whose image does not match its
//!   manifest refuses to start, naming the file.
//!
//! `root_` because the agents' grid partition is a cgroup.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// A small image (random kernel and initrd) with its manifest in `dir`;
/// returns the image digest (sha256 of the manifest).
fn make_image(dir: &Path) -> String {
    fs::create_dir_all(dir).unwrap();
    let kernel: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let initrd: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    fs::write(dir.join("vmlinuz"), &kernel).unwrap();
    fs::write(dir.join("initrd.img"), &initrd).unwrap();
    let manifest = format!(
        "{{\n  \"version\": 1,\n  \"name\": \"tiny\",\n  \"interpreters\": [\"sh\"],\n  \"files\": {{\n    \
         \"vmlinuz\": {{ \"sha256\": \"{}\", \"size\": {} }},\n    \
         \"initrd.img\": {{ \"sha256\": \"{}\", \"size\": {} }}\n  }}\n}}\n",
        sha256_hex(&kernel),
        kernel.len(),
        sha256_hex(&initrd),
        initrd.len()
    );
    fs::write(dir.join("manifest.json"), &manifest).unwrap();
    sha256_hex(manifest.as_bytes())
}

/// A workload file for the image at `image`, naming `digest`.
fn write_workload(dir: &Path, image: &Path, digest: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("tiny.toml");
    fs::write(
        &path,
        format!(
            "name = \"tiny\"\nimage = {}\nimage_digest = \"{digest}\"\nvcpus = 1\nmemory_mib = 64\n\
             cmdline = \"console=ttyS0\"\ninterpreters = [\"sh\"]\n",
            toml_str(&image.display().to_string())
        ),
    )
    .unwrap();
    path
}

fn serving_conf(conf: &mut Conf, workload: &Path) {
    conf.path("vm", "workload", workload)
        .set("transfer", "enabled", "true")
        .str("transfer", "listen", &format!("127.0.0.1:{}", free_port()));
}

/// Agent A serving a fresh image; returns the cluster, the image dir and
/// its digest.
fn serving_cluster(t: &str) -> (Cluster, tempfile::TempDir, PathBuf, String) {
    let _ = t;
    let mut c = Cluster::start_controller(|_| {});
    let files = tempfile::tempdir().unwrap();
    let image = files.path().join("a-images/tiny");
    let digest = make_image(&image);
    let wl = write_workload(&files.path().join("a"), &image, &digest);
    c.add_agent_with("imga", 1, AgentLoad::MemoryOnly, |conf| {
        serving_conf(conf, &wl)
    });
    c.wait_hosts("imga to register its image", Duration::from_secs(30), |v| {
        host(v, "imga").map(|_| ())
    });
    (c, files, image, digest)
}

/// Starts agent `host` on `conf` without waiting for it to come up.
fn spawn_agent(c: &Cluster, host: &str, adjust: impl FnOnce(&mut Conf)) -> (Harness, Agent) {
    let h = Harness::new();
    let mut conf = c.agent_conf(
        &h,
        host,
        &unique("sparegrid-img"),
        1,
        &AgentLoad::MemoryOnly,
    );
    adjust(&mut conf);
    let path = h.write_config(&conf);
    let agent = Agent::spawn(&path, &h.dir().join("agent.log"), h.addr).expect("spawn the agent");
    (h, agent)
}

#[test]
fn root_a_missing_image_is_fetched_from_a_peer_checked_and_cached() {
    const T: &str = "root_a_missing_image_is_fetched_from_a_peer_checked_and_cached";
    if skip_unless_root(T) {
        return;
    }
    let (mut c, files, image, digest) = serving_cluster(T);
    let cached = files.path().join("b-images/tiny");
    let wl = write_workload(&files.path().join("b"), &cached, &digest);
    assert!(!cached.exists());
    let i = c.add_agent_with("imgb", 1, AgentLoad::MemoryOnly, |conf| {
        serving_conf(conf, &wl)
    });
    for f in ["manifest.json", "vmlinuz", "initrd.img"] {
        assert_eq!(
            fs::read(cached.join(f)).unwrap(),
            fs::read(image.join(f)).unwrap(),
            "{f} differs from the source's"
        );
    }
    let left: Vec<String> = fs::read_dir(cached.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["tiny".to_string()],
        "only the image, no staging left"
    );
    let log = c.agents[i].agent.log();
    assert!(log.contains("image fetched"), "{log}");
    // A served it; B caches it and now serves it to others too.
    let a = c.agent("imga").agent.metrics();
    let sent = metric_value(&a, "sparegrid_transfer_sent_bytes_total", &[]).unwrap_or(0.0);
    assert!(sent >= 1_000_000.0, "imga served {sent} bytes\n{a}");
    for f in ["manifest", "vmlinuz", "initrd"] {
        let published = c.agents[i]
            .data_dir()
            .join("transfer/complete")
            .join(format!("img-{}-{f}", &digest[..32]));
        assert!(
            published.is_file(),
            "imgb does not serve {}",
            published.display()
        );
    }
}

#[test]
fn root_a_corrupt_source_is_rejected_and_nothing_is_cached() {
    const T: &str = "root_a_corrupt_source_is_rejected_and_nothing_is_cached";
    if skip_unless_root(T) {
        return;
    }
    let (c, files, _image, digest) = serving_cluster(T);
    // Corrupt the kernel A serves (its published copy, not its image).
    let data_dir = c.agent("imga").data_dir();
    let served = data_dir
        .join("transfer/complete")
        .join(format!("img-{}-vmlinuz", &digest[..32]));
    let mut bytes = fs::read(&served).unwrap_or_else(|e| panic!("{}: {e}", served.display()));
    bytes[1000] ^= 0xff;
    fs::write(&served, &bytes).unwrap();

    let cached = files.path().join("b-images/tiny");
    let wl = write_workload(&files.path().join("b"), &cached, &digest);
    let (_h, mut agent) = spawn_agent(&c, "imgc", |conf| serving_conf(conf, &wl));
    let st = agent
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_tail(40)));
    assert!(!st.success(), "the agent must not start without its image");
    let log = agent.log();
    assert!(
        log.contains("vmlinuz") && log.contains("no source served it whole"),
        "the error names the file:\n{log}"
    );
    assert!(!cached.exists(), "a corrupt image must not be visible");
    let parent = cached.parent().unwrap();
    let left = fs::read_dir(parent).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no staging directory left in {}", parent.display());
}

#[test]
fn root_an_unknown_image_is_a_clear_error() {
    const T: &str = "root_an_unknown_image_is_a_clear_error";
    if skip_unless_root(T) {
        return;
    }
    let (c, files, _image, _digest) = serving_cluster(T);
    let unknown = "0".repeat(64);
    let wl = write_workload(
        &files.path().join("d"),
        &files.path().join("none/tiny"),
        &unknown,
    );
    let (_h, mut agent) = spawn_agent(&c, "imgd", |conf| {
        serving_conf(conf, &wl);
    });
    // It asks for a while (a source may register late), then gives up.
    let st = agent
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_tail(40)));
    assert!(!st.success());
    let log = agent.log();
    assert!(
        log.contains("image_unknown") && log.contains(&unknown),
        "{log}"
    );
}

#[test]
fn root_an_image_only_the_controller_serves_is_fetched_from_it() {
    const T: &str = "root_an_image_only_the_controller_serves_is_fetched_from_it";
    if skip_unless_root(T) {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let image = files.path().join("ctl-images/tiny");
    let digest = make_image(&image);
    let mut c = Cluster::start_controller(|conf| {
        conf.sections.set(
            "data",
            "images",
            format!("[{}]", toml_str(&image.display().to_string())),
        );
    });
    let cached = files.path().join("e-images/tiny");
    let wl = write_workload(&files.path().join("e"), &cached, &digest);
    let i = c.add_agent_with("imge", 1, AgentLoad::MemoryOnly, |conf| {
        serving_conf(conf, &wl)
    });
    for f in ["manifest.json", "vmlinuz", "initrd.img"] {
        assert_eq!(
            fs::read(cached.join(f)).unwrap(),
            fs::read(image.join(f)).unwrap(),
            "{f} differs from the controller's"
        );
    }
    let log = c.agents[i].agent.log();
    assert!(
        log.contains("image fetched") && log.contains("controller"),
        "{log}"
    );
    let m = c.controller.metrics();
    let sent = metric_value(&m, "sparegrid_transfer_sent_bytes_total", &[]).unwrap_or(0.0);
    assert!(
        sent >= 1_000_000.0,
        "the controller served {sent} bytes\n{m}"
    );

    // An image whose kernel is not its manifest's: the controller does not
    // start, and says which file.
    let mut k = fs::read(image.join("vmlinuz")).unwrap();
    k[10] ^= 0xff;
    fs::write(image.join("vmlinuz"), &k).unwrap();
    let mut conf = ControllerConf::cluster(
        ([127, 0, 0, 1], free_port()).into(),
        &files.path().join("bad.db"),
        &Tokens::new(),
    );
    conf.sections.set(
        "data",
        "images",
        format!("[{}]", toml_str(&image.display().to_string())),
    );
    let path = files.path().join("bad-controller.toml");
    conf.write(&path);
    let out = std::process::Command::new(controller_bin())
        .arg("--config")
        .arg(&path)
        .arg("run")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("data.images[0]") && text.contains("vmlinuz"),
        "the error names the entry and the file: {text}"
    );
}
