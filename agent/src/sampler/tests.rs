//! Sampler tests against the fixture snapshots in `testdata/` (see its
//! README for the numbers), a local TCP listener, and the real /proc.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sparegrid_proto::Metric;

use super::*;
use crate::config::SamplerSection;

const LINK: u64 = 1_000_000;
const STEP: Duration = Duration::from_millis(2500);

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sampler/testdata")
}

/// Copies snapshot `name` over the tree at `root`, rewriting files in place
/// (the sampler keeps them open).
fn install(root: &Path, name: &str) {
    fn walk(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let to = dst.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &to);
            } else {
                std::fs::write(&to, std::fs::read(e.path()).unwrap()).unwrap();
            }
        }
    }
    walk(&testdata().join(name), root);
}

fn cfg() -> SamplerSection {
    SamplerSection {
        link_bytes_per_sec: LINK,
        ..SamplerSection::default()
    }
}

/// A fixture root holding t0, and a sampler on it.
fn fixture(cfg: &SamplerSection) -> (tempfile::TempDir, Sampler) {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "t0");
    let s = Sampler::new(cfg, dir.path()).unwrap();
    (dir, s)
}

/// Samples t0 with `g0`, then t1 with `g1` 2.5 s later.
fn two_samples(cfg: &SamplerSection, g0: &GridUsage, g1: &GridUsage) -> (RawSample, RawSample) {
    let (dir, mut s) = fixture(cfg);
    let t0 = Instant::now();
    let first = s.sample_at(g0, t0).unwrap();
    install(dir.path(), "t1");
    let second = s.sample_at(g1, t0 + STEP).unwrap();
    (first, second)
}

#[track_caller]
fn assert_close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
}

#[track_caller]
fn get(s: &RawSample, m: Metric) -> RawReading {
    s.get(m)
        .unwrap_or_else(|| panic!("{m} unavailable in {s:?}"))
}

#[test]
fn first_sample_has_levels_but_no_rates() {
    let (_dir, mut s) = fixture(&cfg());
    let first = s.sample_at(&GridUsage::default(), Instant::now()).unwrap();
    for m in [
        Metric::Cpu,
        Metric::Network,
        Metric::Disk,
        Metric::PsiCpu,
        Metric::PsiMemory,
        Metric::PsiIo,
    ] {
        assert_eq!(first.get(m), None, "{m}");
    }
    assert_eq!(first.get(Metric::Rtt), None, "no RTT target configured");
    assert_close(get(&first, Metric::LoadAvg).normalised, 0.25);
    assert_close(get(&first, Metric::Memory).normalised, 0.625);
    assert_eq!(first.elapsed, Duration::ZERO);
    assert_eq!(s.ncpu(), 4);
}

#[test]
fn fixture_rates_are_exact() {
    let g = GridUsage::default();
    let (_, s) = two_samples(&cfg(), &g, &g);
    assert_eq!(s.elapsed, STEP);
    let want = [
        (Metric::Cpu, 0.9, 0.9),
        (Metric::LoadAvg, 0.5, 0.5),
        (Metric::Memory, 0.75, 0.75),
        (Metric::Network, 250_000.0, 0.25),
        (Metric::Disk, 0.4, 0.4),
        (Metric::PsiCpu, 0.2, 0.2),
        (Metric::PsiMemory, 0.1, 0.1),
        (Metric::PsiIo, 0.5, 0.5),
    ];
    for (m, raw, normalised) in want {
        let r = get(&s, m);
        assert_close(r.raw, raw);
        assert_close(r.normalised, normalised);
        assert_eq!(r.grid, 0.0, "{m}");
    }
    assert_eq!(s.get(Metric::Rtt), None);
    assert_eq!(s.mem_total_bytes, 8_000_000 * 1024);
    assert_eq!(s.mem_available_bytes, 2_000_000 * 1024);
}

#[test]
fn grid_usage_is_subtracted() {
    let g0 = GridUsage {
        cpu_ns: 1_000_000_000,
        memory_bytes: 0,
        cpu_stall_us: Some(100_000),
        runnable: 0.0,
    };
    let g1 = GridUsage {
        cpu_ns: 7_000_000_000,
        memory_bytes: 1_024_000_000,
        cpu_stall_us: Some(350_000),
        runnable: 1.0,
    };
    let (_, s) = two_samples(&cfg(), &g0, &g1);
    // Host CPU 0.9, grid 6 CPU-seconds over 2.5 s × 4 CPUs = 0.6.
    let cpu = get(&s, Metric::Cpu);
    assert_close(cpu.raw, 0.3);
    assert_close(cpu.grid, 0.6);
    assert_close(cpu.normalised, 0.3);
    let load = get(&s, Metric::LoadAvg);
    assert_close(load.raw, 0.25);
    assert_close(load.grid, 0.25);
    let mem = get(&s, Metric::Memory);
    assert_close(mem.raw, 0.625);
    assert_close(mem.grid, 0.125);
    let psi = get(&s, Metric::PsiCpu);
    assert_close(psi.raw, 0.1);
    assert_close(psi.grid, 0.1);
    // Only CPU pressure has a grid figure.
    assert_close(get(&s, Metric::PsiMemory).raw, 0.1);
    // MemAvailable is reported as the kernel has it (the reserve is about it).
    assert_eq!(s.mem_available_bytes, 2_000_000 * 1024);
}

#[test]
fn missing_pressure_dir_means_no_psi() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "t0");
    std::fs::remove_dir_all(dir.path().join("pressure")).unwrap();
    let mut s = Sampler::new(&cfg(), dir.path()).unwrap();
    assert!(!s.psi.present());
    let t0 = Instant::now();
    s.sample_at(&GridUsage::default(), t0).unwrap();
    install(dir.path(), "t1");
    std::fs::remove_dir_all(dir.path().join("pressure")).unwrap();
    let second = s.sample_at(&GridUsage::default(), t0 + STEP).unwrap();
    for m in [Metric::PsiCpu, Metric::PsiMemory, Metric::PsiIo] {
        assert_eq!(second.get(m), None, "{m}");
    }
    assert_close(get(&second, Metric::Cpu).raw, 0.9);
}

#[test]
fn unsupported_errors_are_recognised() {
    let e = |source| SampleError::Read {
        path: "/proc/pressure/cpu".into(),
        source,
    };
    assert!(e(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)).is_unavailable());
    assert!(e(std::io::ErrorKind::NotFound.into()).is_unavailable());
    assert!(!e(std::io::ErrorKind::PermissionDenied.into()).is_unavailable());
}

#[test]
fn configured_interfaces_only() {
    let g = GridUsage::default();
    let only = |names: &[&str]| {
        let c = SamplerSection {
            interfaces: names.iter().map(|s| s.to_string()).collect(),
            ..cfg()
        };
        get(&two_samples(&c, &g, &g).1, Metric::Network)
    };
    let eth1 = only(&["eth1"]);
    assert_close(eth1.raw, 50_000.0);
    assert_close(eth1.normalised, 0.05);
    // lo moved 1e9 bytes in 2.5 s: far over the link, clamped.
    let lo = only(&["lo"]);
    assert_close(lo.raw, 400_000_000.0);
    assert_eq!(lo.normalised, 1.0);
    assert_close(only(&["eth0", "eth1", "missing9"]).raw, 250_000.0);
}

#[test]
fn disk_filtering() {
    let g = GridUsage::default();
    let busiest = |disks: &[&str]| {
        let c = SamplerSection {
            disks: disks.iter().map(|s| s.to_string()).collect(),
            ..cfg()
        };
        get(&two_samples(&c, &g, &g).1, Metric::Disk).normalised
    };
    // Default: whole disks only; partitions, loop and ram devices are busier.
    assert_close(busiest(&[]), 0.4);
    assert_close(busiest(&["sda"]), 0.2);
    assert_close(busiest(&["sda", "dm-0"]), 0.2);
    assert_close(busiest(&["sda1"]), 0.8);
    assert_close(busiest(&["loop0"]), 1.0);

    let (_dir, mut s) = fixture(&cfg());
    s.sample_at(&g, Instant::now()).unwrap();
    assert_eq!(s.disk.watched(), ["sda", "nvme0n1", "dm-0"]);
}

#[test]
fn disk_hotplug_keeps_counters_of_remaining_devices() {
    let (dir, mut s) = fixture(&cfg());
    let t0 = Instant::now();
    s.sample_at(&GridUsage::default(), t0).unwrap();
    install(dir.path(), "t1");
    let stats = dir.path().join("diskstats");
    let t1 = std::fs::read_to_string(&stats).unwrap();
    // A new disk appears first (so every index shifts) and dm-0 goes away.
    let changed: String =
        std::iter::once("   8      16 sdb 1 0 8 1 1 0 8 1 0 99999 2 0 0 0 0 0 0\n")
            .chain(t1.split_inclusive('\n').filter(|l| !l.contains("dm-0")))
            .collect();
    std::fs::write(&stats, changed).unwrap();
    let second = s.sample_at(&GridUsage::default(), t0 + STEP).unwrap();
    // sdb has no earlier counter: it adds nothing yet.
    assert_close(get(&second, Metric::Disk).normalised, 0.4);
    assert_eq!(s.disk.watched(), ["sdb", "sda", "nvme0n1"]);
}

#[test]
fn zero_elapsed_gives_no_rates() {
    let (_dir, mut s) = fixture(&cfg());
    let t0 = Instant::now();
    s.sample_at(&GridUsage::default(), t0).unwrap();
    let again = s.sample_at(&GridUsage::default(), t0).unwrap();
    for m in [Metric::Cpu, Metric::Network, Metric::Disk, Metric::PsiIo] {
        assert_eq!(again.get(m), None, "{m}");
    }
}

#[test]
fn cpu_without_a_tick_repeats_the_last_reading() {
    let (dir, mut s) = fixture(&cfg());
    let t0 = Instant::now();
    let g = GridUsage::default();
    s.sample_at(&g, t0).unwrap();
    install(dir.path(), "t1");
    let second = s.sample_at(&g, t0 + STEP).unwrap();
    // Same counters 10 ms later: no tick passed.
    let third = s
        .sample_at(&g, t0 + STEP + Duration::from_millis(10))
        .unwrap();
    assert_eq!(third.get(Metric::Cpu), second.get(Metric::Cpu));
    // Network did get a (zero) rate over those 10 ms.
    assert_eq!(get(&third, Metric::Network).raw, 0.0);
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Sampler::new(&cfg(), dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().join("stat").display().to_string()),
        "{err}"
    );

    let (dir, mut s) = fixture(&cfg());
    std::fs::write(dir.path().join("meminfo"), "nonsense\n").unwrap();
    let err = s.sample(&GridUsage::default()).unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().join("meminfo").display().to_string()),
        "{err}"
    );
    assert!(err.contains("MemTotal"), "{err}");

    let (dir, mut s) = fixture(&cfg());
    std::fs::write(dir.path().join("pressure/io"), "some avg10=x\n").unwrap();
    let err = s.sample(&GridUsage::default()).unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().join("pressure/io").display().to_string()),
        "{err}"
    );
}

fn rtt_cfg(target: String) -> SamplerSection {
    SamplerSection {
        rtt_target: target,
        rtt_baseline: Duration::from_millis(500),
        rtt_max: Duration::from_secs(2),
        rtt_every: Duration::from_secs(60),
        ..cfg()
    }
}

/// Samples until the RTT probe has published, at most 10 s.
fn first_rtt(s: &mut Sampler) -> RawReading {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = s.sample(&GridUsage::default()).unwrap().get(Metric::Rtt) {
            return r;
        }
        assert!(Instant::now() < deadline, "no RTT probe within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn rtt_to_a_local_listener_is_low_and_cached() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_dir, mut s) = fixture(&rtt_cfg(listener.local_addr().unwrap().to_string()));
    let r = first_rtt(&mut s);
    // A loopback connect is far below the 500 ms baseline.
    assert_eq!(r.normalised, 0.0, "{r:?}");
    assert!(r.raw < 500.0, "{r:?}");
    assert_eq!(r.grid, 0.0);
    // rtt_every is 60 s: later samples reuse the value, no second connect.
    for _ in 0..20 {
        assert_eq!(
            s.sample(&GridUsage::default()).unwrap().get(Metric::Rtt),
            Some(r)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    listener.set_nonblocking(true).unwrap();
    let mut accepted = 0;
    while listener.accept().is_ok() {
        accepted += 1;
    }
    assert_eq!(accepted, 1);
}

#[test]
fn rtt_to_a_closed_port_is_full_load() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_dir, mut s) = fixture(&rtt_cfg(format!("127.0.0.1:{port}")));
    let r = first_rtt(&mut s);
    assert_eq!(r.normalised, 1.0, "{r:?}");
    assert_eq!(r.raw, 2000.0);
}

#[test]
fn rtt_probe_never_blocks_the_sample() {
    // 192.0.2.0/24 (TEST-NET-1) is not routed: the connect hangs until its
    // timeout or fails at once, either way on the probe thread.
    let c = SamplerSection {
        rtt_max: Duration::from_secs(5),
        ..rtt_cfg("192.0.2.1:9".into())
    };
    let (_dir, mut s) = fixture(&c);
    let started = Instant::now();
    for _ in 0..10 {
        s.sample(&GridUsage::default()).unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn real_proc_twice_within_range() {
    let c = SamplerSection::default();
    let mut s = Sampler::new(&c, Path::new("/proc")).unwrap();
    let g = GridUsage::default();
    s.sample(&g).unwrap();
    // Long enough for at least one clock tick on every CPU.
    std::thread::sleep(Duration::from_millis(60));
    let second = s.sample(&g).unwrap();
    assert!(second.elapsed >= Duration::from_millis(60));
    assert!(s.ncpu() >= 1);
    for m in Metric::ALL {
        if let Some(r) = second.get(m) {
            assert!((0.0..=1.0).contains(&r.normalised), "{m}: {r:?}");
            assert!(r.raw >= 0.0 && r.raw.is_finite(), "{m}: {r:?}");
        }
    }
    for m in [
        Metric::Cpu,
        Metric::LoadAvg,
        Metric::Memory,
        Metric::Network,
    ] {
        assert!(second.get(m).is_some(), "{m} missing from the real /proc");
    }
    assert!(second.mem_total_bytes > 0);
    assert!(second.mem_available_bytes <= second.mem_total_bytes);
}

/// Cost of one sample on the real /proc, next to the cost of only reading
/// the eight files (the kernel's share, which no parser can save). Run with
/// `cargo test --release -p sparegrid-agent --lib sampler::tests::sample_cost -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run in release by hand"]
fn sample_cost() {
    fn median(mut f: impl FnMut()) -> (Duration, Duration) {
        let mut times: Vec<Duration> = (0..5000)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        times.sort();
        (times[times.len() / 2], times[times.len() * 9 / 10])
    }
    let root = Path::new("/proc");
    let mut s = Sampler::new(&SamplerSection::default(), root).unwrap();
    let g = GridUsage::default();
    let (m, p90) = median(|| {
        std::hint::black_box(s.sample(&g).unwrap());
    });
    println!("sample: median {m:?}, p90 {p90:?}");
    let names = [
        "stat",
        "loadavg",
        "meminfo",
        "net/dev",
        "diskstats",
        "pressure/cpu",
        "pressure/memory",
        "pressure/io",
    ];
    let mut files: Vec<_> = names
        .iter()
        .filter_map(|n| procfile::ProcFile::open_optional(root, n).unwrap())
        .collect();
    let (m, p90) = median(|| {
        for f in &mut files {
            std::hint::black_box(f.read().unwrap());
        }
    });
    println!("reads only: median {m:?}, p90 {p90:?}");
}
