//! `sparegrid-agent check`: what this host supports, as a [`CheckReport`]
//! of ok / warn / fail items.
//!
//! Owns the host capability probes: libvirt reachability (with the `libvirt`
//! feature), KVM usability ([`kvm_usable`], [`kvm_is_pvm`]), the domain type
//! `auto` would pick, the cgroup layout (v1, v2 or hybrid) and controllers,
//! `cpu.idle`, pressure stall information, and writable state directories.
//!
//! cgroup and procfs probes use the injected `agent.cgroup_root` and
//! `agent.proc_root`, so tests run them on fixture trees; `/dev/kvm` and
//! `/sys/module` are fixed host paths. A warning never fails the check
//! ([`CheckReport::all_ok`]); it marks something that works in a degraded way.

use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::config::{CgroupVersion, Config, RuntimeKind};

/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";
/// Present when the host's KVM is PVM (pagetable-based nested
/// virtualisation), which boots only PVM-enabled guest kernels.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// The error opening `dev` (normally [`KVM_DEVICE`]) for reading and
/// writing, or `None` when it opens.
pub fn kvm_open_error(dev: &Path) -> Option<std::io::Error> {
    OpenOptions::new().read(true).write(true).open(dev).err()
}

/// True when `dev` (normally [`KVM_DEVICE`]) opens for reading and writing.
pub fn kvm_usable(dev: &Path) -> bool {
    kvm_open_error(dev).is_none()
}

/// True when the `kvm_pvm` module directory (normally [`KVM_PVM_MODULE`])
/// exists: KVM works, but stock guest kernels hang in early boot (seen on a
/// nested test host: a Debian cloud kernel never reached its first console
/// line under `kvm`, and booted in seconds under `qemu`/TCG).
pub fn kvm_is_pvm(module_dir: &Path) -> bool {
    module_dir.exists()
}

/// What `domain_type = "auto"` treats as usable KVM on this host:
/// [`KVM_DEVICE`] opens read-write and it is not PVM.
pub fn host_kvm_usable() -> bool {
    kvm_usable(Path::new(KVM_DEVICE)) && !kvm_is_pvm(Path::new(KVM_PVM_MODULE))
}

/// How an item came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but degraded (TCG only, no PSI, a directory still missing…).
    Warn,
    /// The agent cannot run as configured.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckItem {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl CheckItem {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> CheckItem {
        CheckItem {
            name,
            status,
            detail: detail.into(),
        }
    }
}

/// Everything `check` found, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckReport {
    pub items: Vec<CheckItem>,
}

impl CheckReport {
    /// True when no item failed (warnings allowed).
    pub fn all_ok(&self) -> bool {
        self.items.iter().all(|i| i.status != Status::Fail)
    }

    /// The first item called `name`.
    pub fn get(&self, name: &str) -> Option<&CheckItem> {
        self.items.iter().find(|i| i.name == name)
    }

    /// How many items came out as `status`.
    pub fn count(&self, status: Status) -> usize {
        self.items.iter().filter(|i| i.status == status).count()
    }

    fn push(&mut self, item: CheckItem) {
        self.items.push(item);
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        for i in &self.items {
            writeln!(
                f,
                "[{}] {:width$}  {}",
                i.status.label(),
                i.name,
                i.detail,
                width = width
            )?;
        }
        let warn = self.count(Status::Warn);
        let fail = self.count(Status::Fail);
        writeln!(
            f,
            "{} ok, {} warning{}, {} failed",
            self.count(Status::Ok),
            warn,
            if warn == 1 { "" } else { "s" },
            fail
        )
    }
}

/// The cgroup filesystem layout under a cgroup root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Unified hierarchy at the root (`cgroup.controllers` there).
    V2,
    /// v1 controllers plus a v2 tree at `<root>/unified`.
    Hybrid,
    /// v1 controllers only.
    V1,
    /// Nothing recognisable.
    None,
}

impl CgroupLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupLayout::V2 => "v2",
            CgroupLayout::Hybrid => "hybrid",
            CgroupLayout::V1 => "v1",
            CgroupLayout::None => "none",
        }
    }
}

/// v1 controller names found as directories under `root` (a co-mounted
/// `cpu,cpuacct` counts for both), without the named `systemd` hierarchy
/// and the hybrid `unified` tree. Sorted, deduplicated.
pub fn v1_controllers(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .flat_map(|e| {
            e.file_name()
                .to_string_lossy()
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|n| !n.is_empty() && n != "unified" && n != "systemd" && !n.starts_with("name="))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Controllers listed in `<dir>/cgroup.controllers` (v2), or `None` if
/// the file cannot be read.
pub fn v2_controllers(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    Some(text.split_whitespace().map(str::to_string).collect())
}

/// v2 when `<root>/cgroup.controllers` exists; hybrid when
/// `<root>/unified/cgroup.controllers` does; v1 when any v1 controller
/// directory does.
pub fn detect_cgroup_layout(root: &Path) -> CgroupLayout {
    if root.join("cgroup.controllers").exists() {
        CgroupLayout::V2
    } else if root.join("unified/cgroup.controllers").exists() {
        CgroupLayout::Hybrid
    } else if !v1_controllers(root).is_empty() {
        CgroupLayout::V1
    } else {
        CgroupLayout::None
    }
}

/// `major.minor` of a kernel release string such as `6.1.0-56-cloud-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Where `cpu.idle` can be seen: the grid partition, any direct child group
/// (the root group has none), else the kernel version (5.15 added it).
/// Returns the evidence, or `None` if there is none.
pub fn cpu_idle_evidence(cpu_dir: &Path, partition: &str, proc_root: &Path) -> Option<String> {
    let in_partition = cpu_dir.join(partition).join("cpu.idle");
    if in_partition.exists() {
        return Some(format!("{} exists", in_partition.display()));
    }
    if cpu_dir.join("cpu.idle").exists() {
        return Some(format!("{} exists", cpu_dir.join("cpu.idle").display()));
    }
    if let Ok(entries) = std::fs::read_dir(cpu_dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let f = e.path().join("cpu.idle");
            if f.exists() {
                return Some(format!("{} exists", f.display()));
            }
        }
    }
    let release = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease")).ok()?;
    match kernel_version(&release) {
        Some(v) if v >= (5, 15) => Some(format!("kernel {} (>= 5.15)", release.trim())),
        _ => None,
    }
}

/// Checks that `dir` exists and a file can be created in it.
fn dir_item(name: &'static str, dir: &Path) -> CheckItem {
    if !dir.exists() {
        return CheckItem::new(
            name,
            Status::Warn,
            format!(
                "{} does not exist yet (the agent creates it at start)",
                dir.display()
            ),
        );
    }
    if !dir.is_dir() {
        return CheckItem::new(
            name,
            Status::Fail,
            format!("{} is not a directory", dir.display()),
        );
    }
    let probe = dir.join(format!(".sparegrid-check-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            CheckItem::new(name, Status::Ok, format!("{} writable", dir.display()))
        }
        Err(e) => CheckItem::new(
            name,
            Status::Fail,
            format!("{} is not writable: {e}", dir.display()),
        ),
    }
}

fn kvm_item() -> CheckItem {
    match kvm_open_error(Path::new(KVM_DEVICE)) {
        Some(e) => CheckItem::new(
            "kvm",
            Status::Warn,
            format!("TCG only: cannot open {KVM_DEVICE} read-write: {e}"),
        ),
        None if kvm_is_pvm(Path::new(KVM_PVM_MODULE)) => CheckItem::new(
            "kvm",
            Status::Warn,
            format!(
                "{KVM_DEVICE} opens, but KVM is PVM ({KVM_PVM_MODULE}): stock guest kernels hang; \
                 auto uses TCG"
            ),
        ),
        None => CheckItem::new("kvm", Status::Ok, format!("{KVM_DEVICE} usable")),
    }
}

#[cfg(feature = "libvirt")]
fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

#[cfg(feature = "libvirt")]
fn libvirt_item(cfg: &Config, report: &mut CheckReport) {
    let uri = cfg.runtime.libvirt_uri.as_str();
    virt::error::clear_error_callback();
    let item = match virt::connect::Connect::open(Some(uri)) {
        Ok(conn) => {
            let lib = conn.lib_version().map(version_string);
            let driver = conn.driver_type().unwrap_or_else(|_| "?".into());
            let hyp = conn.hyp_version().map(version_string);
            let detail = match (lib, hyp) {
                (Ok(lib), Ok(hyp)) => format!("{uri} reachable: libvirt {lib}, {driver} {hyp}"),
                (Ok(lib), Err(_)) => format!("{uri} reachable: libvirt {lib}, {driver}"),
                (Err(e), _) => format!("{uri} reachable, version unknown: {}", e.message()),
            };
            CheckItem::new("libvirt", Status::Ok, detail)
        }
        Err(e) => CheckItem::new(
            "libvirt",
            Status::Fail,
            format!("cannot connect to {uri}: {}", e.message()),
        ),
    };
    report.push(item);
}

#[cfg(feature = "libvirt")]
fn domain_type_item(cfg: &Config, report: &mut CheckReport) {
    use crate::runtime::libvirt::{resolve_domain_type, VirtType};

    let requested = cfg.runtime.domain_type;
    let kvm = host_kvm_usable();
    let resolved = resolve_domain_type(requested, kvm);
    let how = match requested {
        crate::config::DomainType::Auto => "auto",
        _ => "configured",
    };
    let item = match resolved {
        VirtType::Kvm if !kvm => CheckItem::new(
            "domain type",
            Status::Fail,
            "kvm (configured), but KVM is not usable here; set runtime.domain_type = \"auto\" or \"qemu\"",
        ),
        VirtType::Kvm => CheckItem::new("domain type", Status::Ok, format!("kvm ({how})")),
        VirtType::Qemu => CheckItem::new(
            "domain type",
            Status::Ok,
            format!("qemu: TCG emulation, several times slower than KVM ({how})"),
        ),
    };
    report.push(item);
}

#[cfg(not(feature = "libvirt"))]
fn domain_type_item(_cfg: &Config, _report: &mut CheckReport) {}

#[cfg(not(feature = "libvirt"))]
fn libvirt_item(_cfg: &Config, report: &mut CheckReport) {
    report.push(CheckItem::new(
        "libvirt",
        Status::Fail,
        "runtime.kind = \"libvirt\", but this build has no libvirt support (feature `libvirt`)",
    ));
}

fn cgroup_items(cfg: &Config, report: &mut CheckReport) {
    let root = &cfg.agent.cgroup_root;
    let layout = detect_cgroup_layout(root);
    let detail = match layout {
        CgroupLayout::V2 => format!("v2 (unified at {})", root.display()),
        CgroupLayout::Hybrid => format!(
            "hybrid (v1 controllers, v2 tree at {}; the grid partition uses v1)",
            root.join("unified").display()
        ),
        CgroupLayout::V1 => format!("v1 at {}", root.display()),
        CgroupLayout::None => format!("no cgroup hierarchy found under {}", root.display()),
    };
    let mismatch = match (cfg.cgroup.version, layout) {
        (CgroupVersion::V2, CgroupLayout::V1 | CgroupLayout::Hybrid) => {
            Some("cgroup.version = \"v2\", but the root is not a unified hierarchy")
        }
        (CgroupVersion::V1, CgroupLayout::V2) => {
            Some("cgroup.version = \"v1\", but the root is a unified hierarchy")
        }
        _ => None,
    };
    let status = if layout == CgroupLayout::None || mismatch.is_some() {
        Status::Fail
    } else {
        Status::Ok
    };
    let detail = match mismatch {
        Some(m) => format!("{detail}; {m}"),
        None => detail,
    };
    report.push(CheckItem::new("cgroup", status, detail));

    // Controllers and cpu.idle, for the hierarchy the grid partition uses.
    let partition = cfg.cgroup.partition.as_str();
    match layout {
        CgroupLayout::V2 => {
            let ctrls = v2_controllers(root).unwrap_or_default();
            let missing: Vec<&str> = ["cpu", "memory"]
                .into_iter()
                .filter(|c| !ctrls.iter().any(|x| x == c))
                .collect();
            let status = if missing.is_empty() {
                Status::Ok
            } else {
                Status::Fail
            };
            let mut detail = format!("v2: {}", ctrls.join(" "));
            if !missing.is_empty() {
                detail.push_str(&format!("; missing {}", missing.join(", ")));
            }
            report.push(CheckItem::new("controllers", status, detail));
            report.push(
                match cpu_idle_evidence(root, partition, &cfg.agent.proc_root) {
                    Some(ev) => CheckItem::new(
                        "cpu.idle",
                        Status::Ok,
                        format!("supported ({ev}): grid gets cpu.weight=1 and cpu.idle=1"),
                    ),
                    None => CheckItem::new(
                        "cpu.idle",
                        Status::Warn,
                        "not supported (kernel < 5.15): grid gets cpu.weight=1 only",
                    ),
                },
            );
        }
        CgroupLayout::V1 | CgroupLayout::Hybrid => {
            let ctrls = v1_controllers(root);
            let has = |c: &str| ctrls.iter().any(|x| x == c);
            let mut problems = Vec::new();
            let mut status = Status::Ok;
            for (c, needed, why) in [
                ("cpu", true, "no CPU weight"),
                ("memory", true, "no memory ceiling"),
                ("cpuacct", false, "no grid CPU usage to subtract"),
                ("freezer", false, "processes are stopped with SIGSTOP"),
            ] {
                if !has(c) {
                    status = match (status, needed) {
                        (_, true) | (Status::Fail, _) => Status::Fail,
                        _ => Status::Warn,
                    };
                    problems.push(format!("{c} missing: {why}"));
                }
            }
            let mut detail = format!("v1: {}", ctrls.join(" "));
            if layout == CgroupLayout::Hybrid {
                let unified = v2_controllers(&root.join("unified")).unwrap_or_default();
                detail.push_str(&format!("; unified: {}", unified.join(" ")));
            }
            if !problems.is_empty() {
                detail.push_str(&format!("; {}", problems.join("; ")));
            }
            report.push(CheckItem::new("controllers", status, detail));
            let cpu_dir = root.join("cpu");
            report.push(if cpu_dir.join("cpu.idle").exists() {
                CheckItem::new(
                    "cpu.idle",
                    Status::Ok,
                    "v1 cpu controller has cpu.idle: grid gets cpu.shares=2 and cpu.idle=1",
                )
            } else {
                CheckItem::new(
                    "cpu.idle",
                    Status::Warn,
                    "not in the v1 cpu controller: grid gets cpu.shares=2 only",
                )
            });
        }
        CgroupLayout::None => {}
    }
}

fn psi_item(proc_root: &Path) -> CheckItem {
    let path: PathBuf = proc_root.join("pressure/cpu");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.starts_with("some ") => {
            CheckItem::new("psi", Status::Ok, format!("{} readable", path.display()))
        }
        Ok(_) => CheckItem::new(
            "psi",
            Status::Warn,
            format!("{} has unexpected content: PSI metrics off", path.display()),
        ),
        Err(e) => CheckItem::new(
            "psi",
            Status::Warn,
            format!(
                "{} not readable ({e}): PSI metrics off (kernel needs CONFIG_PSI, boot with psi=1)",
                path.display()
            ),
        ),
    }
}

/// Runs every probe for `cfg` and returns the report. Never panics; each
/// failure becomes an item.
pub fn run_check(cfg: &Config) -> CheckReport {
    let mut report = CheckReport::default();
    let runtime = match cfg.runtime.kind {
        RuntimeKind::Libvirt => format!("libvirt at {}", cfg.runtime.libvirt_uri),
        RuntimeKind::Process => "process (grid work as host processes; libvirt not used)".into(),
    };
    report.push(CheckItem::new("runtime", Status::Ok, runtime));
    let libvirt = cfg.runtime.kind == RuntimeKind::Libvirt;
    if libvirt {
        libvirt_item(cfg, &mut report);
    }
    report.push(kvm_item());
    if libvirt {
        domain_type_item(cfg, &mut report);
    }
    cgroup_items(cfg, &mut report);
    report.push(psi_item(&cfg.agent.proc_root));
    report.push(dir_item("run_dir", &cfg.agent.run_dir));
    report.push(dir_item("data_dir", &cfg.agent.data_dir));
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn v2_root(root: &Path, controllers: &str) {
        touch(&root.join("cgroup.controllers"), controllers);
    }

    fn v1_root(root: &Path, controllers: &[&str]) {
        for c in controllers {
            touch(&root.join(c).join("cgroup.procs"), "");
        }
    }

    fn config(root: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.runtime.kind = RuntimeKind::Process;
        cfg.agent.cgroup_root = root.join("cgroup");
        cfg.agent.proc_root = root.join("proc");
        cfg.agent.run_dir = root.join("run");
        cfg.agent.data_dir = root.join("data");
        cfg
    }

    #[test]
    fn layout_detection() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        assert_eq!(detect_cgroup_layout(&r.join("missing")), CgroupLayout::None);
        assert_eq!(detect_cgroup_layout(r), CgroupLayout::None);

        let v2 = r.join("v2");
        v2_root(&v2, "cpuset cpu io memory pids\n");
        assert_eq!(detect_cgroup_layout(&v2), CgroupLayout::V2);
        assert_eq!(
            v2_controllers(&v2).unwrap(),
            ["cpuset", "cpu", "io", "memory", "pids"]
        );

        let v1 = r.join("v1");
        v1_root(&v1, &["cpu,cpuacct", "memory", "freezer", "systemd"]);
        assert_eq!(detect_cgroup_layout(&v1), CgroupLayout::V1);
        assert_eq!(v1_controllers(&v1), ["cpu", "cpuacct", "freezer", "memory"]);

        let hy = r.join("hybrid");
        v1_root(&hy, &["cpu", "cpuacct", "memory", "freezer"]);
        touch(&hy.join("unified/cgroup.controllers"), "hugetlb\n");
        assert_eq!(detect_cgroup_layout(&hy), CgroupLayout::Hybrid);
        assert_eq!(v1_controllers(&hy), ["cpu", "cpuacct", "freezer", "memory"]);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.1.0-56-cloud-amd64\n"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn cpu_idle_evidence_from_groups_or_kernel() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cg");
        let proc_root = t.path().join("proc");
        v2_root(&cg, "cpu memory");
        assert_eq!(cpu_idle_evidence(&cg, "sparegrid", &proc_root), None);
        touch(&proc_root.join("sys/kernel/osrelease"), "5.10.0-28-amd64\n");
        assert_eq!(cpu_idle_evidence(&cg, "sparegrid", &proc_root), None);
        touch(
            &proc_root.join("sys/kernel/osrelease"),
            "6.1.0-56-cloud-amd64\n",
        );
        let ev = cpu_idle_evidence(&cg, "sparegrid", &proc_root).unwrap();
        assert!(ev.contains("6.1.0"), "{ev}");
        touch(&cg.join("system.slice/cpu.idle"), "0");
        let ev = cpu_idle_evidence(&cg, "sparegrid", &proc_root).unwrap();
        assert!(ev.contains("system.slice/cpu.idle"), "{ev}");
        touch(&cg.join("sparegrid/cpu.idle"), "1");
        let ev = cpu_idle_evidence(&cg, "sparegrid", &proc_root).unwrap();
        assert!(ev.contains("sparegrid/cpu.idle"), "{ev}");
    }

    #[test]
    fn v2_host_with_psi_and_dirs_is_ok() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        v2_root(&cfg.agent.cgroup_root, "cpuset cpu io memory pids\n");
        touch(&cfg.agent.cgroup_root.join("sparegrid/cpu.idle"), "1");
        touch(
            &cfg.agent.proc_root.join("pressure/cpu"),
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        fs::create_dir_all(&cfg.agent.run_dir).unwrap();
        fs::create_dir_all(&cfg.agent.data_dir).unwrap();
        let r = run_check(&cfg);
        let status = |n: &str| r.get(n).unwrap_or_else(|| panic!("no {n} in {r}")).status;
        assert_eq!(status("runtime"), Status::Ok);
        assert_eq!(status("cgroup"), Status::Ok);
        assert!(r.get("cgroup").unwrap().detail.starts_with("v2"));
        assert_eq!(status("controllers"), Status::Ok);
        assert_eq!(status("cpu.idle"), Status::Ok);
        assert_eq!(status("psi"), Status::Ok);
        assert_eq!(status("run_dir"), Status::Ok);
        assert_eq!(status("data_dir"), Status::Ok);
        assert!(
            r.get("libvirt").is_none(),
            "process runtime does not need libvirt"
        );
        // The kvm item depends on the host; nothing else may fail.
        assert!(r.all_ok(), "{r}");
        // No probe file is left behind.
        assert_eq!(fs::read_dir(&cfg.agent.run_dir).unwrap().count(), 0);
    }

    #[test]
    fn hybrid_host_reports_v1_controllers_and_v1_cpu_idle() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        let root = &cfg.agent.cgroup_root;
        v1_root(root, &["cpu", "cpuacct", "memory", "freezer", "systemd"]);
        touch(&root.join("unified/cgroup.controllers"), "hugetlb\n");
        touch(&root.join("cpu/cpu.idle"), "0");
        let r = run_check(&cfg);
        let cg = r.get("cgroup").unwrap();
        assert_eq!(cg.status, Status::Ok);
        assert!(cg.detail.starts_with("hybrid"), "{}", cg.detail);
        let c = r.get("controllers").unwrap();
        assert_eq!(c.status, Status::Ok, "{}", c.detail);
        assert!(
            c.detail.contains("v1: cpu cpuacct freezer memory"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("unified: hugetlb"), "{}", c.detail);
        assert_eq!(r.get("cpu.idle").unwrap().status, Status::Ok);
    }

    #[test]
    fn missing_controllers_warn_or_fail() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        v1_root(&cfg.agent.cgroup_root, &["cpu", "memory"]);
        let r = run_check(&cfg);
        let c = r.get("controllers").unwrap();
        assert_eq!(c.status, Status::Warn, "{}", c.detail);
        assert!(c.detail.contains("freezer missing"), "{}", c.detail);
        assert_eq!(r.get("cpu.idle").unwrap().status, Status::Warn);

        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        v1_root(&cfg.agent.cgroup_root, &["cpu", "freezer", "cpuacct"]);
        let r = run_check(&cfg);
        assert_eq!(r.get("controllers").unwrap().status, Status::Fail);
        assert!(!r.all_ok());

        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        v2_root(&cfg.agent.cgroup_root, "cpuset io pids\n");
        let r = run_check(&cfg);
        let c = r.get("controllers").unwrap();
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("missing cpu, memory"), "{}", c.detail);
    }

    #[test]
    fn no_cgroups_and_version_mismatch_fail() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        let r = run_check(&cfg);
        assert_eq!(r.get("cgroup").unwrap().status, Status::Fail);
        assert!(r.get("controllers").is_none());

        let t = tempfile::tempdir().unwrap();
        let mut cfg = config(t.path());
        cfg.cgroup.version = CgroupVersion::V2;
        v1_root(
            &cfg.agent.cgroup_root,
            &["cpu", "cpuacct", "memory", "freezer"],
        );
        let r = run_check(&cfg);
        let cg = r.get("cgroup").unwrap();
        assert_eq!(cg.status, Status::Fail);
        assert!(cg.detail.contains("cgroup.version"), "{}", cg.detail);
    }

    #[test]
    fn psi_missing_or_disabled_warns() {
        let t = tempfile::tempdir().unwrap();
        let cfg = config(t.path());
        let p = psi_item(&cfg.agent.proc_root);
        assert_eq!(p.status, Status::Warn);
        assert!(p.detail.contains("pressure/cpu"), "{}", p.detail);
        touch(&cfg.agent.proc_root.join("pressure/cpu"), "");
        assert_eq!(psi_item(&cfg.agent.proc_root).status, Status::Warn);
    }

    #[test]
    fn dirs_missing_warn_file_fails() {
        let t = tempfile::tempdir().unwrap();
        let missing = dir_item("run_dir", &t.path().join("nope"));
        assert_eq!(missing.status, Status::Warn);
        assert!(
            missing.detail.contains("does not exist"),
            "{}",
            missing.detail
        );
        let file = t.path().join("file");
        fs::write(&file, "").unwrap();
        assert_eq!(dir_item("data_dir", &file).status, Status::Fail);
        assert_eq!(dir_item("data_dir", t.path()).status, Status::Ok);
    }

    #[test]
    fn display_aligns_and_summarises() {
        let r = CheckReport {
            items: vec![
                CheckItem::new("libvirt", Status::Ok, "qemu:///system reachable"),
                CheckItem::new("kvm", Status::Warn, "TCG only"),
                CheckItem::new("psi", Status::Fail, "broken"),
            ],
        };
        let text = r.to_string();
        assert_eq!(
            text,
            "[ ok ] libvirt  qemu:///system reachable\n\
             [warn] kvm      TCG only\n\
             [FAIL] psi      broken\n\
             1 ok, 1 warning, 1 failed\n"
        );
        assert!(!r.all_ok());
        assert!(CheckReport::default().all_ok());
    }

    #[test]
    fn kvm_probes() {
        assert!(!kvm_usable(Path::new("/nonexistent/kvm")));
        assert!(kvm_open_error(Path::new("/nonexistent/kvm")).is_some());
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("kvm");
        fs::write(&dev, "").unwrap();
        assert!(kvm_usable(&dev));
        assert!(!kvm_is_pvm(&t.path().join("kvm_pvm")));
        fs::create_dir(t.path().join("kvm_pvm")).unwrap();
        assert!(kvm_is_pvm(&t.path().join("kvm_pvm")));
    }

    #[cfg(feature = "libvirt")]
    #[test]
    fn libvirt_items_with_the_test_driver() {
        let t = tempfile::tempdir().unwrap();
        let mut cfg = config(t.path());
        cfg.runtime.kind = RuntimeKind::Libvirt;
        cfg.runtime.libvirt_uri = "test:///default".into();
        cfg.runtime.domain_type = crate::config::DomainType::Qemu;
        let r = run_check(&cfg);
        let l = r.get("libvirt").unwrap();
        assert_eq!(l.status, Status::Ok, "{}", l.detail);
        assert!(
            l.detail.contains("test:///default reachable: libvirt "),
            "{}",
            l.detail
        );
        let d = r.get("domain type").unwrap();
        assert_eq!(d.status, Status::Ok);
        assert!(d.detail.starts_with("qemu"), "{}", d.detail);

        cfg.runtime.libvirt_uri = "bogus:///nowhere".into();
        let r = run_check(&cfg);
        let l = r.get("libvirt").unwrap();
        assert_eq!(l.status, Status::Fail);
        assert!(l.detail.contains("bogus:///nowhere"), "{}", l.detail);
        assert!(!r.all_ok());
    }

    #[cfg(feature = "libvirt")]
    #[test]
    fn version_strings() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(7_002_022), "7.2.22");
    }
}
