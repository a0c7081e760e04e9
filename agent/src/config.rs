//! Agent configuration: the TOML schema, its defaults and `validate()`.
//!
//! Every section uses `deny_unknown_fields`, so a typo fails at start with the
//! field's name. Durations are humantime strings ("250ms", "30s", "10m").
//! Defaults run as they are on a libvirt host.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sparegrid_proto::Metric;

/// A config file that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentSection,
    pub sampler: SamplerSection,
    pub load: LoadSection,
    pub policy: PolicySection,
    pub cgroup: CgroupSection,
    pub runtime: RuntimeSection,
    pub vm: VmTemplate,
    pub controller: ControllerSection,
    /// Peer-to-peer work stealing ([`crate::peer`]).
    pub peers: crate::peer::config::PeersSection,
    /// The resumable file-transfer endpoint ([`crate::transfer`]).
    pub transfer: crate::transfer::TransferConfig,
    /// Grid networking on the overlay: the grid bridge, its filtering
    /// ([`crate::overlay`]).
    pub overlay: crate::overlay::OverlaySection,
    /// The WireGuard tunnel endpoint of the grid overlay
    /// ([`crate::tunnel::service`]); its address and peers come from the
    /// controller.
    pub tunnel: crate::tunnel::AgentTunnelSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Host name reported in status; empty means the kernel's hostname.
    pub host_name: String,
    /// Status and metrics HTTP listener.
    pub listen: SocketAddr,
    /// Runtime files: guest channel sockets, console logs.
    pub run_dir: PathBuf,
    /// Persistent state.
    pub data_dir: PathBuf,
    /// Root of procfs (injected so tests can use fixtures).
    pub proc_root: PathBuf,
    /// Root of the cgroup filesystem.
    pub cgroup_root: PathBuf,
    /// How many transitions status keeps.
    pub transition_history: usize,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            host_name: String::new(),
            listen: "127.0.0.1:7410".parse().expect("static address"),
            run_dir: PathBuf::from("/run/sparegrid"),
            data_dir: PathBuf::from("/var/lib/sparegrid"),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            transition_history: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerSection {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Link capacity in bytes per second that network throughput is measured against.
    pub link_bytes_per_sec: u64,
    /// Interfaces to count; empty means every interface except `lo`.
    pub interfaces: Vec<String>,
    /// Block devices to watch; empty means every whole disk (no partitions, loop or ram).
    pub disks: Vec<String>,
    /// `host:port` probed with a TCP connect each sample; empty disables the RTT metric.
    pub rtt_target: String,
    /// Round-trip time that counts as 0 load.
    #[serde(with = "humantime_serde")]
    pub rtt_baseline: Duration,
    /// Round-trip time that counts as full load (1.0). Also the connect timeout.
    #[serde(with = "humantime_serde")]
    pub rtt_max: Duration,
    /// Probe the RTT target every this often (a connect per 250 ms sample is wasteful).
    #[serde(with = "humantime_serde")]
    pub rtt_every: Duration,
}

impl Default for SamplerSection {
    fn default() -> Self {
        SamplerSection {
            interval: Duration::from_millis(250),
            link_bytes_per_sec: 125_000_000, // 1 Gbit/s
            interfaces: Vec::new(),
            disks: Vec::new(),
            rtt_target: String::new(),
            rtt_baseline: Duration::from_millis(1),
            rtt_max: Duration::from_millis(50),
            rtt_every: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    #[default]
    Max,
    WeightedMean,
}

impl Combine {
    pub fn as_str(self) -> &'static str {
        match self {
            Combine::Max => "max",
            Combine::WeightedMean => "weighted_mean",
        }
    }
}

/// Per-metric weights; a weight of 0 switches the metric off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub cpu: f64,
    pub load_avg: f64,
    pub memory: f64,
    pub network: f64,
    pub disk: f64,
    pub psi_cpu: f64,
    pub psi_memory: f64,
    pub psi_io: f64,
    pub rtt: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            cpu: 1.0,
            load_avg: 0.8,
            memory: 1.0,
            network: 1.0,
            disk: 0.9,
            psi_cpu: 0.8,
            psi_memory: 1.0,
            psi_io: 0.8,
            rtt: 1.0,
        }
    }
}

impl Weights {
    pub fn get(&self, m: Metric) -> f64 {
        match m {
            Metric::Cpu => self.cpu,
            Metric::LoadAvg => self.load_avg,
            Metric::Memory => self.memory,
            Metric::Network => self.network,
            Metric::Disk => self.disk,
            Metric::PsiCpu => self.psi_cpu,
            Metric::PsiMemory => self.psi_memory,
            Metric::PsiIo => self.psi_io,
            Metric::Rtt => self.rtt,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadSection {
    pub combine: Combine,
    pub weights: Weights,
    /// Time constant for rises; 0 shows a spike at once.
    #[serde(with = "humantime_serde")]
    pub attack: Duration,
    /// Time constant for falls; a lull shows slowly.
    #[serde(with = "humantime_serde")]
    pub decay: Duration,
}

impl Default for LoadSection {
    fn default() -> Self {
        LoadSection {
            combine: Combine::Max,
            weights: Weights::default(),
            attack: Duration::ZERO,
            decay: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// Suspend every running grid VM at once when the load factor is above this.
    pub suspend_above: f64,
    /// Resume only after the load factor stayed below this for `resume_after`.
    pub resume_below: f64,
    #[serde(with = "humantime_serde")]
    pub resume_after: Duration,
    /// Launch another grid VM only after the load factor stayed below this for `launch_after`.
    pub launch_below: f64,
    #[serde(with = "humantime_serde")]
    pub launch_after: Duration,
    /// Reclaim a grid VM suspended for longer than this.
    #[serde(with = "humantime_serde")]
    pub reclaim_after: Duration,
    /// What reclaiming a VM suspended too long does: `destroy` it (its
    /// subtask goes back to the controller as preempted), `save` its state
    /// to disk (libvirt managed save) and restore it here once the host is
    /// calm, so the subtask finishes where it started, or `migrate`: save
    /// it, then move the saved state to an idle host the controller picks
    /// and restore it there (see `crate::migrate`); while no host takes it,
    /// it stays saved here as with `save`.
    pub reclaim_mode: ReclaimMode,
    /// Reclaim a grid VM still launching after this long.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// MemAvailable floor in MiB: below it, grid VMs are reclaimed at once.
    pub memory_reserve_mib: u64,
    pub max_grid_vms: u32,
    /// Total memory all grid VMs may hold, MiB.
    pub memory_budget_mib: u64,
    /// Total vCPUs all grid VMs may hold.
    pub vcpu_budget: u32,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            suspend_above: 0.75,
            resume_below: 0.5,
            resume_after: Duration::from_secs(30),
            launch_below: 0.4,
            launch_after: Duration::from_secs(60),
            reclaim_after: Duration::from_secs(600),
            reclaim_mode: ReclaimMode::Destroy,
            boot_timeout: Duration::from_secs(60),
            memory_reserve_mib: 1024,
            max_grid_vms: 4,
            memory_budget_mib: 4096,
            vcpu_budget: 4,
        }
    }
}

/// `policy.reclaim_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReclaimMode {
    #[default]
    Destroy,
    Save,
    Migrate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// v2 when the cgroup root is a unified mount, v1 otherwise.
    #[default]
    Auto,
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupSection {
    /// Partition name under the cgroup root; grid VMs and processes live below it.
    pub partition: String,
    pub version: CgroupVersion,
    /// Memory ceiling for the whole partition, MiB (0: use policy.memory_budget_mib).
    pub memory_max_mib: u64,
}

impl Default for CgroupSection {
    fn default() -> Self {
        CgroupSection {
            partition: "sparegrid".into(),
            version: CgroupVersion::Auto,
            memory_max_mib: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    Libvirt,
    Process,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DomainType {
    /// `kvm` when /dev/kvm is usable, `qemu` (TCG) otherwise.
    #[default]
    Auto,
    Kvm,
    Qemu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    pub kind: RuntimeKind,
    pub libvirt_uri: String,
    pub domain_type: DomainType,
    /// Path to the emulator; empty lets libvirt choose.
    pub emulator: String,
    /// Where libvirt keeps managed save images (`<dir>/<vm>.save`): the
    /// state `reclaim_mode = "migrate"` uploads. libvirt's own
    /// `/var/lib/libvirt/qemu/save` for `qemu:///system`.
    pub libvirt_save_dir: PathBuf,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            kind: RuntimeKind::Libvirt,
            libvirt_uri: "qemu:///system".into(),
            domain_type: DomainType::Auto,
            emulator: String::new(),
            libvirt_save_dir: PathBuf::from("/var/lib/libvirt/qemu/save"),
        }
    }
}

/// What each grid VM looks like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmTemplate {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Guest kernel (libvirt runtime).
    pub kernel: PathBuf,
    /// Guest initramfs (libvirt runtime).
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Command a process-runtime "VM" runs (process runtime).
    pub command: Vec<String>,
    /// A workload file (`workloads/default.toml`): when set, its image's
    /// kernel and initrd (checked against the image manifest's digests),
    /// vCPUs, memory and command line replace the fields above at start.
    pub workload: PathBuf,
}

impl Default for VmTemplate {
    fn default() -> Self {
        VmTemplate {
            vcpus: 1,
            memory_mib: 256,
            kernel: PathBuf::from("/var/lib/sparegrid/images/default/vmlinuz"),
            initrd: PathBuf::from("/var/lib/sparegrid/images/default/initrd.img"),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
            command: vec!["/bin/sh".into(), "-c".into(), "while :; do :; done".into()],
            workload: PathBuf::new(),
        }
    }
}

/// Joining a controller (see [`crate::grid`]): it pushes subtasks to this
/// agent (`dispatch = "push"`), or this agent leases them
/// (`dispatch = "pull"`, for hosts the controller cannot reach; see
/// [`crate::grid::pull`]). Off while `url` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSection {
    /// Controller base URL (`http://host:port` or `https://host:port`);
    /// empty: do not join a controller.
    pub url: String,
    /// Agent token, sent to the controller and required on `POST /v1/subtasks`;
    /// empty: no token.
    pub token: String,
    /// Subtasks this agent runs at once.
    pub slots: u32,
    /// URL the controller pushes subtasks to; empty: `http://` + `agent.listen`
    /// (with the host name in place of an unspecified address).
    pub advertise_url: String,
    /// PEM file of CA certificates to trust for an `https://` controller,
    /// besides the built-in roots; empty: the built-in roots only.
    pub ca_cert: PathBuf,
    /// How this agent gets work: `push` (the controller sends it to
    /// `advertise_url`) or `pull` (the agent leases it; it advertises no
    /// URL, so the controller never pushes to it, and it runs only pull
    /// jobs). Changing it needs a restart.
    pub dispatch: AgentDispatch,
    /// How to find the controller while `url` is empty: `none` (run
    /// stand-alone) or `srv` (the DNS SRV record `_sparegrid._tcp`, see
    /// [`crate::discover`]; looked up at start and again on SIGHUP).
    pub discover: Discover,
    /// Domain of the SRV record (`_sparegrid._tcp.<domain>`); empty: the
    /// search domains of /etc/resolv.conf.
    pub discover_domain: String,
    /// DNS server to ask (`ip:port`); empty: the system's resolvers.
    pub discover_nameserver: String,
    /// Reach a discovered controller over https (SRV records carry no scheme).
    pub discover_https: bool,
    /// Most bytes of a subtask's stdout that reach the controller. Stdout
    /// over the 1 MiB sent inline spills to a file under
    /// `agent.data_dir/outputs` and is uploaded to the controller's
    /// `/v1/data` (when it serves one; else it is cut at 1 MiB); past this
    /// it is cut. At least 1 MiB; default 1 GiB.
    pub max_output_bytes: u64,
}

/// `controller.discover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Discover {
    #[default]
    None,
    Srv,
}

/// `controller.dispatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AgentDispatch {
    #[default]
    Push,
    Pull,
}

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            url: String::new(),
            token: String::new(),
            slots: 1,
            advertise_url: String::new(),
            ca_cert: PathBuf::new(),
            dispatch: AgentDispatch::Push,
            discover: Discover::None,
            discover_domain: String::new(),
            discover_nameserver: String::new(),
            discover_https: false,
            max_output_bytes: crate::subtask::DEFAULT_MAX_OUTPUT_BYTES,
        }
    }
}

impl ControllerSection {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// The DNS server `discover_nameserver` names, if any (validated).
    pub fn discover_nameserver(&self) -> Option<std::net::SocketAddr> {
        self.discover_nameserver.parse().ok()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let inline = crate::subtask::Limits::default().output_cap_bytes as u64;
        if self.max_output_bytes < inline {
            return Err(invalid(
                "controller.max_output_bytes",
                format!(
                    "must be at least {inline} (the stdout sent inline), got {}",
                    self.max_output_bytes
                ),
            ));
        }
        if !self.discover_nameserver.is_empty()
            && self
                .discover_nameserver
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(invalid(
                "controller.discover_nameserver",
                format!(
                    "must be ip:port (e.g. 10.0.0.53:53), got {:?}",
                    self.discover_nameserver
                ),
            ));
        }
        let domain_ok = |d: &str| {
            d.split('.').filter(|l| !l.is_empty()).all(|l| {
                l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        };
        if !domain_ok(&self.discover_domain) {
            return Err(invalid(
                "controller.discover_domain",
                format!("must be a DNS domain name, got {:?}", self.discover_domain),
            ));
        }
        fn http_url(field: &str, v: &str, https: bool) -> Result<(), ConfigError> {
            let schemes = if https {
                "http:// or https://"
            } else {
                "http://"
            };
            let rest = v
                .strip_prefix("http://")
                .or_else(|| v.strip_prefix("https://").filter(|_| https))
                .ok_or_else(|| invalid(field, format!("must start with {schemes}, got {v:?}")))?;
            if rest.is_empty() || rest.starts_with('/') || v.chars().any(|c| c.is_whitespace()) {
                return Err(invalid(
                    field,
                    format!("must be {schemes}host[:port], got {v:?}"),
                ));
            }
            Ok(())
        }
        if !self.enabled() {
            return Ok(());
        }
        http_url("controller.url", &self.url, true)?;
        if !self.advertise_url.is_empty() && self.dispatch == AgentDispatch::Pull {
            return Err(invalid(
                "controller.advertise_url",
                "is only used with dispatch = \"push\"; a pulling agent advertises no URL",
            ));
        }
        if !self.advertise_url.is_empty() {
            // The agent serves plain HTTP.
            http_url("controller.advertise_url", &self.advertise_url, false)?;
        }
        if !self.ca_cert.as_os_str().is_empty() {
            let https_discovered =
                self.url.is_empty() && self.discover == Discover::Srv && self.discover_https;
            if !self.url.starts_with("https://") && !https_discovered {
                return Err(invalid(
                    "controller.ca_cert",
                    format!(
                        "is only used with an https:// controller.url, got {:?}",
                        self.url
                    ),
                ));
            }
            if !self.ca_cert.is_absolute() {
                return Err(invalid(
                    "controller.ca_cert",
                    format!("must be an absolute path, got {:?}", self.ca_cert),
                ));
            }
        }
        if self
            .token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "controller.token",
                "must not contain whitespace or control characters",
            ));
        }
        if !(1..=1024).contains(&self.slots) {
            return Err(invalid(
                "controller.slots",
                format!("must be between 1 and 1024, got {}", self.slots),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field that serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.agent;
        if a.transition_history == 0 {
            return Err(invalid("agent.transition_history", "must be at least 1"));
        }
        for (field, p) in [
            ("agent.run_dir", &a.run_dir),
            ("agent.data_dir", &a.data_dir),
            ("agent.proc_root", &a.proc_root),
            ("agent.cgroup_root", &a.cgroup_root),
        ] {
            if !p.is_absolute() {
                return Err(invalid(
                    field,
                    format!("must be an absolute path, got {p:?}"),
                ));
            }
        }
        let s = &self.sampler;
        if s.interval < Duration::from_millis(10) || s.interval > Duration::from_secs(60) {
            return Err(invalid(
                "sampler.interval",
                format!("must be between 10ms and 60s, got {:?}", s.interval),
            ));
        }
        if s.link_bytes_per_sec == 0 {
            return Err(invalid("sampler.link_bytes_per_sec", "must be above 0"));
        }
        if !s.rtt_target.is_empty() && !s.rtt_target.contains(':') {
            return Err(invalid(
                "sampler.rtt_target",
                format!("must be host:port, got {:?}", s.rtt_target),
            ));
        }
        if s.rtt_max <= s.rtt_baseline {
            return Err(invalid(
                "sampler.rtt_max",
                "must be greater than sampler.rtt_baseline",
            ));
        }
        for m in Metric::ALL {
            let w = self.load.weights.get(m);
            if !w.is_finite() || !(0.0..=1.0).contains(&w) {
                return Err(invalid(
                    &format!("load.weights.{}", m.as_str()),
                    format!("must be between 0 and 1, got {w}"),
                ));
            }
        }
        if Metric::ALL.iter().all(|m| self.load.weights.get(*m) == 0.0) {
            return Err(invalid(
                "load.weights",
                "at least one weight must be above 0",
            ));
        }
        let p = &self.policy;
        for (field, v) in [
            ("policy.suspend_above", p.suspend_above),
            ("policy.resume_below", p.resume_below),
            ("policy.launch_below", p.launch_below),
        ] {
            if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                return Err(invalid(field, format!("must be between 0 and 1, got {v}")));
            }
        }
        if p.resume_below > p.suspend_above {
            return Err(invalid(
                "policy.resume_below",
                format!(
                    "must not exceed policy.suspend_above ({}), got {}",
                    p.suspend_above, p.resume_below
                ),
            ));
        }
        if p.launch_below > p.suspend_above {
            return Err(invalid(
                "policy.launch_below",
                format!(
                    "must not exceed policy.suspend_above ({}), got {}",
                    p.suspend_above, p.launch_below
                ),
            ));
        }
        if p.reclaim_after.is_zero() {
            return Err(invalid("policy.reclaim_after", "must be above 0"));
        }
        if p.boot_timeout.is_zero() {
            return Err(invalid("policy.boot_timeout", "must be above 0"));
        }
        if p.reclaim_mode == ReclaimMode::Migrate {
            let missing = if self.runtime.kind != RuntimeKind::Libvirt {
                Some("runtime.kind = \"libvirt\" (only grid VMs can be saved and moved)")
            } else if !self.transfer.enabled {
                Some("transfer.enabled = true (the saved state moves over the transfer endpoint)")
            } else if !self.controller.enabled() {
                Some("a controller (controller.url: it picks the host a VM moves to)")
            } else {
                None
            };
            if let Some(m) = missing {
                return Err(invalid(
                    "policy.reclaim_mode",
                    format!("\"migrate\" needs {m}"),
                ));
            }
        }
        let v = &self.vm;
        if v.vcpus == 0 {
            return Err(invalid("vm.vcpus", "must be at least 1"));
        }
        if v.memory_mib < 32 {
            return Err(invalid(
                "vm.memory_mib",
                format!("must be at least 32, got {}", v.memory_mib),
            ));
        }
        if p.max_grid_vms > 0 && v.memory_mib > p.memory_budget_mib {
            return Err(invalid(
                "policy.memory_budget_mib",
                format!(
                    "{} is smaller than one VM (vm.memory_mib = {})",
                    p.memory_budget_mib, v.memory_mib
                ),
            ));
        }
        if p.max_grid_vms > 0 && v.vcpus > p.vcpu_budget {
            return Err(invalid(
                "policy.vcpu_budget",
                format!(
                    "{} is smaller than one VM (vm.vcpus = {})",
                    p.vcpu_budget, v.vcpus
                ),
            ));
        }
        match self.runtime.kind {
            RuntimeKind::Process if v.command.is_empty() => {
                return Err(invalid("vm.command", "the process runtime needs a command"));
            }
            RuntimeKind::Libvirt if self.runtime.libvirt_uri.is_empty() => {
                return Err(invalid("runtime.libvirt_uri", "must not be empty"));
            }
            _ => {}
        }
        let part = &self.cgroup.partition;
        if part.is_empty()
            || part.contains("..")
            || part.starts_with('/')
            || !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(invalid(
                "cgroup.partition",
                format!(
                    "must be a relative name of letters, digits, '-', '_', '.', '/', got {part:?}"
                ),
            ));
        }
        self.controller.validate()?;
        self.peers.validate()?;
        self.overlay.validate()?;
        self.transfer
            .validate()
            .map_err(|e| invalid(&e.field, e.message))?;
        if self.transfer.enabled && self.controller.token.is_empty() {
            return Err(invalid(
                "transfer.enabled",
                "the transfer endpoint signs and checks its tokens with the agent token: set controller.token",
            ));
        }
        self.tunnel.validate().map_err(|e| match e {
            crate::tunnel::config::ConfigError::Invalid { field, message } => {
                invalid(&field, message)
            }
            other => invalid("tunnel", other.to_string()),
        })?;
        if self.tunnel.enabled
            && !self.controller.enabled()
            && self.controller.discover == Discover::None
        {
            return Err(invalid(
                "tunnel.enabled",
                "the tunnel takes its overlay address and peers from the controller: set controller.url (or controller.discover)",
            ));
        }
        Ok(())
    }

    /// The partition's memory ceiling in bytes.
    pub fn partition_memory_max_bytes(&self) -> u64 {
        let mib = if self.cgroup.memory_max_mib > 0 {
            self.cgroup.memory_max_mib
        } else {
            self.policy.memory_budget_mib
        };
        mib * 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_valid_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.sampler.interval, Duration::from_millis(250));
        assert_eq!(c.load.combine, Combine::Max);
    }

    #[test]
    fn durations_and_enums_parse() {
        let c = Config::parse(
            r#"
            [sampler]
            interval = "10ms"
            [load]
            combine = "weighted_mean"
            decay = "2s"
            [load.weights]
            rtt = 0.0
            [policy]
            reclaim_after = "5m"
            [runtime]
            kind = "process"
            "#,
        )
        .unwrap();
        assert_eq!(c.sampler.interval, Duration::from_millis(10));
        assert_eq!(c.load.combine, Combine::WeightedMean);
        assert_eq!(c.load.decay, Duration::from_secs(2));
        assert_eq!(c.load.weights.rtt, 0.0);
        assert_eq!(c.policy.reclaim_after, Duration::from_secs(300));
        assert_eq!(c.runtime.kind, RuntimeKind::Process);
    }

    fn field_of(text: &str) -> String {
        match Config::parse(text).unwrap_err() {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::parse("[policy]\nsuspend_abvoe = 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("suspend_abvoe"), "{err}");
        let err = Config::parse("[nonsense]\n").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        assert_eq!(
            field_of("[policy]\nsuspend_above = 1.5\n"),
            "policy.suspend_above"
        );
        assert_eq!(
            field_of("[policy]\nsuspend_above = 0.5\nresume_below = 0.6\nlaunch_below = 0.1\n"),
            "policy.resume_below"
        );
        assert_eq!(
            field_of("[sampler]\ninterval = \"1ms\"\n"),
            "sampler.interval"
        );
        assert_eq!(field_of("[load.weights]\ncpu = -1.0\n"), "load.weights.cpu");
        assert_eq!(field_of("[vm]\nvcpus = 0\n"), "vm.vcpus");
        assert_eq!(
            field_of("[cgroup]\npartition = \"../etc\"\n"),
            "cgroup.partition"
        );
        assert_eq!(
            field_of("[sampler]\nrtt_target = \"nohost\"\n"),
            "sampler.rtt_target"
        );
        assert_eq!(
            field_of("[agent]\nrun_dir = \"relative\"\n"),
            "agent.run_dir"
        );
        assert_eq!(
            field_of("[runtime]\nkind = \"process\"\n[vm]\ncommand = []\n"),
            "vm.command"
        );
        assert_eq!(
            field_of("[policy]\nmemory_budget_mib = 64\n"),
            "policy.memory_budget_mib"
        );
    }

    #[test]
    fn controller_section_is_off_by_default_and_checked_when_on() {
        let c = Config::default();
        assert!(!c.controller.enabled());
        assert_eq!(c.controller.slots, 1);
        // Off: the other fields are not looked at.
        Config::parse("[controller]\nslots = 0\n").unwrap();
        let on = "[controller]\nurl = \"http://ctl:7400\"\n";
        let c = Config::parse(&format!("{on}slots = 4\ntoken = \"s3cret\"\n")).unwrap();
        assert!(c.controller.enabled());
        assert_eq!(c.controller.slots, 4);
        assert_eq!(
            field_of("[controller]\nurl = \"ctl:7400\"\n"),
            "controller.url"
        );
        assert_eq!(
            field_of("[controller]\nurl = \"ftp://ctl\"\n"),
            "controller.url"
        );
        assert_eq!(
            field_of("[controller]\nurl = \"https://\"\n"),
            "controller.url"
        );
        // https with a private CA.
        let tls = "[controller]\nurl = \"https://ctl:7400\"\nca_cert = \"/etc/sparegrid/ca.pem\"\n";
        let c = Config::parse(tls).unwrap();
        assert_eq!(c.controller.ca_cert, PathBuf::from("/etc/sparegrid/ca.pem"));
        assert_eq!(
            field_of(&format!("{on}ca_cert = \"/etc/sparegrid/ca.pem\"\n")),
            "controller.ca_cert",
            "a CA for a plain-http controller is a mistake"
        );
        assert_eq!(
            field_of("[controller]\nurl = \"https://ctl\"\nca_cert = \"ca.pem\"\n"),
            "controller.ca_cert"
        );
        // The agent itself serves plain HTTP.
        assert_eq!(
            field_of(&format!("{on}advertise_url = \"https://10.0.0.1:7410\"\n")),
            "controller.advertise_url"
        );
        assert_eq!(field_of(&format!("{on}slots = 0\n")), "controller.slots");
        assert_eq!(field_of(&format!("{on}slots = 5000\n")), "controller.slots");
        assert_eq!(
            field_of(&format!("{on}max_output_bytes = 1000\n")),
            "controller.max_output_bytes"
        );
        assert_eq!(
            Config::parse(&format!("{on}max_output_bytes = 8388608\n"))
                .unwrap()
                .controller
                .max_output_bytes,
            8 << 20
        );
        assert_eq!(
            field_of(&format!("{on}token = \"a b\"\n")),
            "controller.token"
        );
        assert_eq!(
            field_of(&format!("{on}advertise_url = \"10.0.0.1:7410\"\n")),
            "controller.advertise_url"
        );
        let err = Config::parse("[controller]\nurll = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn controller_discovery_fields_are_checked() {
        let c = Config::parse(
            "[controller]\ndiscover = \"srv\"\ndiscover_domain = \"grid.example.org\"\n\
             discover_nameserver = \"127.0.0.1:5353\"\n",
        )
        .unwrap();
        assert_eq!(c.controller.discover, Discover::Srv);
        assert_eq!(
            c.controller.discover_nameserver(),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert!(!c.controller.enabled(), "enabled only once a URL is found");
        assert_eq!(
            field_of("[controller]\ndiscover_nameserver = \"dns.example\"\n"),
            "controller.discover_nameserver"
        );
        assert_eq!(
            field_of("[controller]\ndiscover_domain = \"a b.example\"\n"),
            "controller.discover_domain"
        );
        assert!(Config::parse("[controller]\ndiscover = \"mdns\"\n").is_err());
        // A CA file for a controller that discovery reaches over https.
        let ok =
            "[controller]\ndiscover = \"srv\"\ndiscover_https = true\nca_cert = \"/etc/ca.pem\"\n";
        assert!(Config::parse(ok).is_ok());
    }

    #[test]
    fn controller_dispatch_is_push_by_default_and_pull_advertises_nothing() {
        assert_eq!(Config::default().controller.dispatch, AgentDispatch::Push);
        let on = "[controller]\nurl = \"http://ctl:7400\"\n";
        let c = Config::parse(&format!("{on}dispatch = \"pull\"\n")).unwrap();
        assert_eq!(c.controller.dispatch, AgentDispatch::Pull);
        let c = Config::parse(&format!("{on}dispatch = \"push\"\n")).unwrap();
        assert_eq!(c.controller.dispatch, AgentDispatch::Push);
        let err = Config::parse(&format!("{on}dispatch = \"p2p\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dispatch") || err.contains("p2p"), "{err}");
        assert_eq!(
            field_of(&format!(
                "{on}dispatch = \"pull\"\nadvertise_url = \"http://10.0.0.1:7410\"\n"
            )),
            "controller.advertise_url",
            "a pulling agent cannot be reached, so an advertised URL is a mistake"
        );
    }

    #[test]
    fn migrate_needs_libvirt_a_transfer_endpoint_and_a_controller() {
        let migrate = "[policy]\nreclaim_mode = \"migrate\"\n";
        let ctl = "[controller]\nurl = \"http://ctl:7400\"\ntoken = \"t\"\n";
        let transfer = "[transfer]\nenabled = true\n";
        let c = Config::parse(&format!("{migrate}{ctl}{transfer}")).unwrap();
        assert_eq!(c.policy.reclaim_mode, ReclaimMode::Migrate);
        for text in [
            format!("{migrate}{ctl}"),
            format!("{migrate}{transfer}"),
            format!("{migrate}{ctl}{transfer}[runtime]\nkind = \"process\"\n"),
        ] {
            assert_eq!(field_of(&text), "policy.reclaim_mode", "{text}");
        }
        let c = Config::parse("[runtime]\nlibvirt_save_dir = \"/srv/save\"\n").unwrap();
        assert_eq!(c.runtime.libvirt_save_dir, PathBuf::from("/srv/save"));
    }

    #[test]
    fn bad_duration_is_a_parse_error_naming_the_field() {
        let err = Config::parse("[policy]\nresume_after = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("resume_after"), "{err}");
    }

    #[test]
    fn load_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/agent.toml"), "{err}");
    }

    #[test]
    fn tunnel_section_parses_and_needs_a_controller() {
        let on = "[controller]\nurl = \"http://10.0.0.1:7400\"\n";
        let c = Config::parse(&format!(
            "{on}[tunnel]\nenabled = true\npublic_endpoint = \"203.0.113.7:51820\"\npersistent_keepalive = \"10s\"\n"
        ))
        .unwrap();
        assert!(c.tunnel.enabled);
        assert_eq!(c.tunnel.keepalive_secs(), Some(10));
        assert_eq!(
            c.tunnel.key_file(&c.agent.data_dir),
            Path::new("/var/lib/sparegrid/tunnel.key")
        );
        assert_eq!(
            field_of("[tunnel]\nenabled = true\n"),
            "tunnel.enabled",
            "peers and the address come from a controller"
        );
        assert_eq!(
            field_of(&format!("{on}[tunnel]\nlisten_port = 0\n")),
            "tunnel.listen_port"
        );
        assert_eq!(
            field_of(&format!("{on}[tunnel]\npublic_endpoint = \"h:1\"\n")),
            "tunnel.public_endpoint"
        );
        let err = Config::parse("[tunnel]\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
