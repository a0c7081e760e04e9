//! The libvirt runtime: grid VMs as libvirt domains, through the `virt`
//! crate (libvirt's C API).
//!
//! Owns the lifecycle of grid domains on one libvirt connection:
//!
//! - launch = define (persistent, so managed save works) + start;
//! - suspend / resume = pause / unpause (memory kept);
//! - save = managed save (state to disk, domain stops); restore = start,
//!   which libvirt restores from the managed save image;
//! - destroy = hard stop if active + undefine with the managed save image;
//! - stats / list from `virDomainGetInfo` and `virDomainHasManagedSaveImage`.
//!
//! **Ownership.** Every grid domain carries a `<metadata>` element in the
//! [`METADATA_NS`] namespace naming its owner (the agent's host name). A
//! domain without that element, or with another owner, is never listed, and
//! every operation on it — including `stats` — fails with
//! [`RuntimeError::NotOurs`] before libvirt is asked to change anything.
//!
//! **Blocking.** Every method blocks on libvirt (a managed save of a large
//! guest takes seconds). The daemon calls the runtime only from its dedicated
//! control thread, never from the async runtime.
//!
//! The domain XML is rendered by the pure [`render_domain_xml`]
//! (`domain_xml.rs`); unit tests here run against libvirt's in-process
//! `test:///default` driver, and `libvirtd_*` tests against a real libvirtd
//! (`qemu:///system`) when `SPAREGRID_LIBVIRTD=1`.
//!
//! **cgroup partition.** `<resource><partition>` takes an absolute libvirt
//! partition path (`/sparegrid`). Without systemd libvirt creates only
//! `/machine` itself, names partition directories `<name>.partition`, and
//! needs them in every hierarchy it binds; `partition.rs` documents what was
//! verified against a real libvirtd and [`prepare_partition`] (run by
//! [`LibvirtRuntime::connect`] when [`LibvirtOptions::cgroup_root`] is set)
//! creates them with the lowest CPU weight and the memory ceiling.

mod domain_xml;
mod partition;

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

pub use domain_xml::{
    channel_socket_path, console_log_path, metadata_element, parse_owner, render_domain_xml,
    xml_escape, GUEST_CHANNEL_NAME, METADATA_NS, METADATA_PREFIX,
};
pub use partition::{libvirt_partition_dir, prepare_partition, PartitionError, PreparedPartition};

pub use crate::check::{host_kvm_usable, kvm_is_pvm, kvm_usable, KVM_DEVICE, KVM_PVM_MODULE};
use crate::config::{Config, DomainType};
use crate::runtime::{RunState, Runtime, RuntimeError, VmInfo, VmSpec};

/// Exists when systemd is the init system (`sd_booted()`).
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

/// Longest path a unix socket address holds (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `qemu:///system` (or `qemu+unix:///system`, with or without a query).
fn is_local_system_qemu(uri: &str) -> bool {
    let path = uri.split('?').next().unwrap_or(uri);
    matches!(path, "qemu:///system" | "qemu+unix:///system")
}

/// A resolved libvirt domain type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtType {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's TCG emulator: works everywhere, several times slower.
    Qemu,
}

impl VirtType {
    /// The `<domain type='…'>` value.
    pub fn as_str(self) -> &'static str {
        match self {
            VirtType::Kvm => "kvm",
            VirtType::Qemu => "qemu",
        }
    }
}

impl std::fmt::Display for VirtType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `auto` → `kvm` when KVM is usable (see [`host_kvm_usable`]), `qemu`
/// otherwise; an explicit choice is kept (an explicit `kvm` without KVM
/// fails at launch, loudly).
pub fn resolve_domain_type(requested: DomainType, kvm_usable: bool) -> VirtType {
    match requested {
        DomainType::Kvm => VirtType::Kvm,
        DomainType::Qemu => VirtType::Qemu,
        DomainType::Auto if kvm_usable => VirtType::Kvm,
        DomainType::Auto => VirtType::Qemu,
    }
}

/// How grid domains are built on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct LibvirtOptions {
    /// Requested domain type; [`LibvirtRuntime::connect`] resolves `auto`.
    pub domain_type: DomainType,
    /// Emulator binary; `None` lets libvirt choose.
    pub emulator: Option<PathBuf>,
    /// Owner written into each domain's metadata: the agent's host name.
    /// Only domains with this owner are listed or touched.
    pub owner: String,
    /// Console logs and guest channel sockets go here.
    pub run_dir: PathBuf,
    /// Absolute libvirt partition path for `<resource><partition>`
    /// (`/machine`, `/sparegrid`, …); `None` leaves the driver default
    /// (`/machine`).
    pub partition: Option<String>,
    /// When set (local libvirt, host without systemd), [`LibvirtRuntime::connect`]
    /// creates the partition under this cgroup root with
    /// [`prepare_partition`], since libvirt creates only `/machine` itself.
    pub cgroup_root: Option<PathBuf>,
    /// Memory ceiling [`prepare_partition`] sets on the partition, bytes.
    pub partition_memory_max_bytes: Option<u64>,
    /// Where libvirt keeps managed save images (`<dir>/<name>.save`).
    pub save_dir: PathBuf,
}

impl LibvirtOptions {
    /// Options from the agent config. The partition is `/<cgroup.partition>`
    /// — on a host without systemd libvirt places it at
    /// [`libvirt_partition_dir`] of that (`sparegrid.partition`), next to,
    /// not inside, the agent's own `<cgroup.partition>` group — prepared
    /// under `agent.cgroup_root` with the partition memory ceiling when the
    /// URI is the local system QEMU driver and systemd is not running (a
    /// remote host's, a session daemon's or the test driver's cgroups are
    /// not ours to create).
    pub fn from_config(cfg: &Config, owner: &str) -> LibvirtOptions {
        let emulator =
            (!cfg.runtime.emulator.is_empty()).then(|| PathBuf::from(&cfg.runtime.emulator));
        let prepare =
            is_local_system_qemu(&cfg.runtime.libvirt_uri) && !Path::new(SYSTEMD_RUNNING).exists();
        LibvirtOptions {
            domain_type: cfg.runtime.domain_type,
            emulator,
            owner: owner.to_string(),
            run_dir: cfg.agent.run_dir.clone(),
            partition: Some(format!("/{}", cfg.cgroup.partition.trim_matches('/'))),
            cgroup_root: prepare.then(|| cfg.agent.cgroup_root.clone()),
            partition_memory_max_bytes: Some(cfg.partition_memory_max_bytes()),
            save_dir: cfg.runtime.libvirt_save_dir.clone(),
        }
    }
}

/// Grid VMs as libvirt domains on one connection. See the module docs.
pub struct LibvirtRuntime {
    conn: Connect,
    uri: String,
    opts: LibvirtOptions,
    virt_type: VirtType,
    /// Domains already checked as ours, by name (see `stats`).
    checked: std::collections::HashMap<String, Domain>,
}

impl std::fmt::Debug for LibvirtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtRuntime")
            .field("uri", &self.uri)
            .field("opts", &self.opts)
            .field("virt_type", &self.virt_type)
            .finish()
    }
}

/// libvirt's message for an operation on `vm`, or `NotFound` when the
/// domain is gone.
fn op_err(vm: &str, op: &'static str, e: VirtError) -> RuntimeError {
    if e.code().is(ErrorNumber::NoDomain) {
        RuntimeError::NotFound { vm: vm.to_string() }
    } else {
        RuntimeError::Op {
            vm: vm.to_string(),
            op,
            message: e.message().to_string(),
        }
    }
}

fn op_msg(vm: &str, op: &'static str, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Op {
        vm: vm.to_string(),
        op,
        message: message.into(),
    }
}

/// A domain name that is safe as a file name in `run_dir`.
fn check_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(op_msg(
            name,
            "launch",
            "name must be letters, digits, '-', '_' or '.' and not start with '.'",
        ))
    }
}

fn map_state(state: DomainState, saved: bool) -> RunState {
    match state {
        DomainState::Running | DomainState::Blocked => RunState::Running,
        DomainState::Paused | DomainState::PMSuspended => RunState::Paused,
        DomainState::Shutoff | DomainState::Crashed => RunState::Stopped { saved },
        DomainState::NoState | DomainState::Shutdown => RunState::Other,
    }
}

impl LibvirtRuntime {
    /// Opens `uri` (`qemu:///system`, `test:///default`, …), prepares the
    /// cgroup partition when [`LibvirtOptions::cgroup_root`] is set, and
    /// resolves the domain type: `auto` is `kvm` when [`host_kvm_usable`]
    /// ([`KVM_DEVICE`] opens read-write and KVM is not PVM, whose hosts boot
    /// only PVM-enabled guest kernels), `qemu` otherwise.
    pub fn connect(uri: &str, opts: LibvirtOptions) -> Result<LibvirtRuntime, RuntimeError> {
        // libvirt's default error handler prints every error to stderr,
        // including the routine "no metadata" of foreign domains; errors
        // reach us as values anyway.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| RuntimeError::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        if let (Some(root), Some(partition)) = (&opts.cgroup_root, &opts.partition) {
            let prepared = prepare_partition(root, partition, opts.partition_memory_max_bytes)
                .map_err(|e| RuntimeError::Op {
                    vm: "*".into(),
                    op: "prepare partition",
                    message: e.to_string(),
                })?;
            if !prepared.dirs.is_empty() {
                tracing::info!(
                    partition = %partition,
                    dirs = ?prepared.dirs,
                    settings = ?prepared.settings,
                    "libvirt partition prepared"
                );
            }
        }
        let virt_type = resolve_domain_type(opts.domain_type, host_kvm_usable());
        tracing::info!(uri, domain_type = %virt_type, owner = %opts.owner, "libvirt runtime connected");
        Ok(LibvirtRuntime {
            conn,
            uri: uri.to_string(),
            opts,
            virt_type,
            checked: Default::default(),
        })
    }

    /// The connection's URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The domain type every launch uses.
    pub fn domain_type(&self) -> VirtType {
        self.virt_type
    }

    pub fn options(&self) -> &LibvirtOptions {
        &self.opts
    }

    /// The domain XML [`Runtime::launch`] would define for `spec` (type
    /// `qemu` when `spec.force_tcg`).
    pub fn domain_xml(&self, spec: &VmSpec) -> String {
        let virt_type = if spec.force_tcg {
            VirtType::Qemu
        } else {
            self.virt_type
        };
        render_domain_xml(spec, &self.opts, virt_type)
    }

    /// libvirt's version (`major * 1_000_000 + minor * 1000 + release`).
    pub fn lib_version(&self) -> Result<u32, RuntimeError> {
        self.conn.lib_version().map_err(|e| RuntimeError::Connect {
            uri: self.uri.clone(),
            message: e.message().to_string(),
        })
    }

    /// The owner recorded in a domain's sparegrid metadata; `None` when the
    /// domain has no sparegrid metadata at all.
    fn owner_of(
        &self,
        dom: &Domain,
        vm: &str,
        op: &'static str,
    ) -> Result<Option<String>, RuntimeError> {
        match dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            0,
        ) {
            Ok(xml) => Ok(Some(parse_owner(&xml).unwrap_or_default())),
            Err(e) if e.code().is(ErrorNumber::NoDomainMetadata) => Ok(None),
            Err(e) => Err(op_err(vm, op, e)),
        }
    }

    fn is_ours(&self, dom: &Domain, vm: &str, op: &'static str) -> Result<bool, RuntimeError> {
        Ok(self.owner_of(dom, vm, op)?.as_deref() == Some(self.opts.owner.as_str()))
    }

    /// Looks `name` up and makes sure it is ours; every operation starts here.
    fn ours(&self, name: &str, op: &'static str) -> Result<Domain, RuntimeError> {
        let dom = self
            .conn
            .lookup_domain_by_name(name)
            .map_err(|e| op_err(name, op, e))?;
        if !self.is_ours(&dom, name, op)? {
            return Err(RuntimeError::NotOurs {
                vm: name.to_string(),
            });
        }
        Ok(dom)
    }

    fn info_of(&self, dom: &Domain, name: &str) -> Result<VmInfo, RuntimeError> {
        let info = dom.info().map_err(|e| op_err(name, "stats", e))?;
        let state = info.state.known().unwrap_or(DomainState::NoState);
        let saved = if matches!(state, DomainState::Shutoff | DomainState::Crashed) {
            dom.has_managed_save(0)
                .map_err(|e| op_err(name, "stats", e))?
        } else {
            false
        };
        let kib = if info.memory > 0 {
            info.memory
        } else {
            info.max_mem
        };
        Ok(VmInfo {
            name: name.to_string(),
            state: map_state(state, saved),
            vcpus: info.nr_virt_cpu,
            memory_mib: kib / 1024,
            cpu_time_ns: info.cpu_time,
        })
    }

    fn state_of(
        &self,
        dom: &Domain,
        name: &str,
        op: &'static str,
    ) -> Result<DomainState, RuntimeError> {
        let info = dom.info().map_err(|e| op_err(name, op, e))?;
        Ok(info.state.known().unwrap_or(DomainState::NoState))
    }

    fn remove_socket(&self, name: &str) {
        let sock = channel_socket_path(&self.opts.run_dir, name);
        if let Err(e) = std::fs::remove_file(&sock) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = name, path = %sock.display(), "cannot remove guest channel socket: {e}");
            }
        }
    }
}

impl Runtime for LibvirtRuntime {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn guest_channel(&self, name: &str) -> Option<PathBuf> {
        Some(channel_socket_path(&self.opts.run_dir, name))
    }

    fn hw_accelerated(&self) -> bool {
        self.virt_type == VirtType::Kvm
    }

    /// QEMU handles suspend (a monitor command), managed save and SIGTERM
    /// itself, so it must get CPU to obey.
    fn control_needs_cpu(&self) -> bool {
        true
    }

    /// A new connection to the same URI with the same options; the
    /// partition was prepared by the first one.
    fn second_handle(&self) -> Result<Option<Box<dyn Runtime>>, RuntimeError> {
        let conn = Connect::open(Some(&self.uri)).map_err(|e| RuntimeError::Connect {
            uri: self.uri.clone(),
            message: e.message().to_string(),
        })?;
        Ok(Some(Box::new(LibvirtRuntime {
            conn,
            uri: self.uri.clone(),
            opts: self.opts.clone(),
            virt_type: self.virt_type,
            checked: Default::default(),
        })))
    }

    /// Defines the domain persistently and starts it. A leftover *inactive*
    /// definition of ours with the same name is undefined first (with its
    /// managed save image, so the launch is a fresh boot); an active one is
    /// an error; a foreign domain with that name is `NotOurs`. If the start
    /// fails, the definition is removed again.
    fn launch(&mut self, spec: &VmSpec) -> Result<(), RuntimeError> {
        const OP: &str = "launch";
        let name = spec.name.as_str();
        check_name(name)?;
        for (what, p) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
            if p.to_str().is_none() {
                return Err(op_msg(name, OP, format!("{what} path {p:?} is not UTF-8")));
            }
        }
        if self.opts.run_dir.to_str().is_none() {
            return Err(op_msg(
                name,
                OP,
                format!("run_dir {:?} is not UTF-8", self.opts.run_dir),
            ));
        }
        let sock = channel_socket_path(&self.opts.run_dir, name);
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(op_msg(
                name,
                OP,
                format!(
                    "guest channel socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                    sock.display()
                ),
            ));
        }
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => {
                if !self.is_ours(&dom, name, OP)? {
                    return Err(RuntimeError::NotOurs {
                        vm: name.to_string(),
                    });
                }
                if dom.is_active().map_err(|e| op_err(name, OP, e))? {
                    return Err(op_msg(
                        name,
                        OP,
                        "a grid VM with this name is already active",
                    ));
                }
                // Redefining needs the old UUID, and a fresh launch must not
                // resume an old save image: drop the old definition.
                dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                    .map_err(|e| op_err(name, OP, e))?;
            }
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
            Err(e) => return Err(op_err(name, OP, e)),
        }
        if let Err(e) = std::fs::create_dir_all(&self.opts.run_dir) {
            return Err(op_msg(
                name,
                OP,
                format!("cannot create run_dir {}: {e}", self.opts.run_dir.display()),
            ));
        }
        // A stale socket from a crashed QEMU makes the bind fail.
        self.remove_socket(name);
        let xml = self.domain_xml(spec);
        let dom = self
            .conn
            .define_domain_xml(&xml)
            .map_err(|e| op_err(name, "define", e))?;
        if let Err(e) = dom.create() {
            let err = op_err(name, "start", e);
            if let Err(u) = dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE) {
                tracing::warn!(
                    vm = name,
                    "cannot undefine after a failed start: {}",
                    u.message()
                );
            }
            return Err(err);
        }
        tracing::info!(vm = name, domain_type = %self.virt_type, "grid VM launched");
        Ok(())
    }

    fn suspend(&mut self, name: &str) -> Result<(), RuntimeError> {
        let dom = self.ours(name, "suspend")?;
        dom.suspend().map_err(|e| op_err(name, "suspend", e))?;
        tracing::info!(vm = name, "grid VM suspended");
        Ok(())
    }

    fn resume(&mut self, name: &str) -> Result<(), RuntimeError> {
        let dom = self.ours(name, "resume")?;
        dom.resume().map_err(|e| op_err(name, "resume", e))?;
        tracing::info!(vm = name, "grid VM resumed");
        Ok(())
    }

    /// Hard-stops the domain if it is active, then undefines it together
    /// with its managed save image and removes its guest channel socket.
    /// The console log stays in `run_dir` for post-mortems (the next launch
    /// under the same name truncates it).
    fn destroy(&mut self, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "destroy";
        self.checked.remove(name);
        let dom = self.ours(name, OP)?;
        if dom.is_active().map_err(|e| op_err(name, OP, e))? {
            match dom.destroy() {
                Ok(()) => {}
                // It stopped between the check and the destroy.
                Err(e) if e.code().is(ErrorNumber::OperationInvalid) => {}
                Err(e) => return Err(op_err(name, OP, e)),
            }
        }
        // A transient domain is gone once destroyed; ours are persistent.
        match dom.is_persistent() {
            Ok(true) => dom
                .undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                .map_err(|e| op_err(name, "undefine", e))?,
            Ok(false) => {}
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
            Err(e) => return Err(op_err(name, OP, e)),
        }
        self.remove_socket(name);
        tracing::info!(vm = name, "grid VM destroyed");
        Ok(())
    }

    fn save(&mut self, name: &str) -> Result<(), RuntimeError> {
        let dom = self.ours(name, "save")?;
        dom.managed_save(0).map_err(|e| op_err(name, "save", e))?;
        tracing::info!(vm = name, "grid VM saved");
        Ok(())
    }

    /// Starts the domain from its managed save image. Fails (instead of
    /// cold-booting) when there is no image. A VM saved while paused comes
    /// back paused in libvirt; it is resumed here, so restore always ends
    /// running.
    fn restore(&mut self, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "restore";
        let dom = self.ours(name, OP)?;
        if !dom.has_managed_save(0).map_err(|e| op_err(name, OP, e))? {
            return Err(op_msg(name, OP, "no managed save image"));
        }
        self.remove_socket(name);
        dom.create().map_err(|e| op_err(name, OP, e))?;
        if self.state_of(&dom, name, OP)? == DomainState::Paused {
            dom.resume().map_err(|e| op_err(name, OP, e))?;
        }
        tracing::info!(vm = name, "grid VM restored");
        Ok(())
    }

    /// `<save_dir>/<name>.save`, when the domain is ours and libvirt says
    /// it has a managed save image.
    fn saved_state(&mut self, name: &str) -> Result<PathBuf, RuntimeError> {
        const OP: &str = "saved_state";
        let dom = self.ours(name, OP)?;
        if !dom.has_managed_save(0).map_err(|e| op_err(name, OP, e))? {
            return Err(op_msg(name, OP, "no managed save image"));
        }
        let path = self.opts.save_dir.join(format!("{name}.save"));
        if !path.is_file() {
            return Err(op_msg(
                name,
                OP,
                format!(
                    "libvirt has a managed save image but {} is not it (runtime.libvirt_save_dir)",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    /// `virDomainRestoreFlags` with this host's XML for `spec` carrying the
    /// image's UUID and domain type (libvirt refuses another name or UUID,
    /// and the CPU state needs the same accelerator), started running, then
    /// defined persistently with the same XML.
    fn restore_moved(&mut self, spec: &VmSpec, file: &Path) -> Result<(), RuntimeError> {
        const OP: &str = "restore_moved";
        let name = spec.name.as_str();
        check_name(name)?;
        let path = file
            .to_str()
            .ok_or_else(|| op_msg(name, OP, format!("state file {file:?} is not UTF-8")))?;
        let saved = self
            .conn
            .save_image_xml_desc(path, 0)
            .map_err(|e| op_err(name, OP, e))?;
        let identity = saved_identity(&saved)
            .ok_or_else(|| op_msg(name, OP, "the saved state's XML has no name, uuid or type"))?;
        if identity.name != name {
            return Err(op_msg(
                name,
                OP,
                format!("the saved state is of grid VM {}", identity.name),
            ));
        }
        match self.conn.lookup_domain_by_name(name) {
            Ok(_) => {
                return Err(op_msg(
                    name,
                    OP,
                    "a domain with this name already exists here",
                ))
            }
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
            Err(e) => return Err(op_err(name, OP, e)),
        }
        std::fs::create_dir_all(&self.opts.run_dir).map_err(|e| {
            op_msg(
                name,
                OP,
                format!("creating {}: {e}", self.opts.run_dir.display()),
            )
        })?;
        self.remove_socket(name);
        let xml = with_uuid(
            &render_domain_xml(spec, &self.opts, identity.virt_type),
            &identity.uuid,
        );
        self.conn
            .restore_domain_flags(path, Some(&xml), sys::VIR_DOMAIN_SAVE_RUNNING)
            .map_err(|e| op_err(name, OP, e))?;
        if let Err(e) = self.conn.define_domain_xml(&xml) {
            // Running but transient: still ours (the metadata says so); a
            // later save would fail, so say so now.
            tracing::warn!(
                vm = name,
                "restored grid VM could not be made persistent: {e}"
            );
        }
        tracing::info!(vm = name, domain_type = %identity.virt_type, "grid VM restored from another host's saved state");
        Ok(())
    }

    /// Called every tick per VM, so a domain once checked as ours is kept:
    /// one RPC (`virDomainGetInfo`) instead of three. A stale handle (the
    /// domain was destroyed, maybe through another connection) answers
    /// NoDomain and is dropped.
    fn stats(&mut self, name: &str) -> Result<VmInfo, RuntimeError> {
        if let Some(dom) = self.checked.get(name) {
            match self.info_of(dom, name) {
                Err(RuntimeError::NotFound { .. }) => {
                    self.checked.remove(name);
                }
                other => return other,
            }
        }
        let dom = self.ours(name, "stats")?;
        let info = self.info_of(&dom, name)?;
        self.checked.insert(name.to_string(), dom);
        Ok(info)
    }

    /// Every domain (active or only defined) whose metadata names this
    /// agent as owner. Domains that vanish while listing are skipped.
    fn list(&mut self) -> Result<Vec<VmInfo>, RuntimeError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| RuntimeError::Op {
                vm: "*".into(),
                op: "list",
                message: e.message().to_string(),
            })?;
        let mut out = Vec::new();
        for dom in doms {
            let name = match dom.name() {
                Ok(n) => n,
                Err(_) => continue,
            };
            let info = self
                .is_ours(&dom, &name, "list")
                .and_then(|ours| ours.then(|| self.info_of(&dom, &name)).transpose());
            match info {
                Ok(Some(info)) => out.push(info),
                Ok(None) | Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests;

/// What a saved domain's XML fixes for its restore.
#[derive(Debug, Clone, PartialEq)]
struct SavedIdentity {
    name: String,
    uuid: String,
    virt_type: VirtType,
}

/// The name, UUID and domain type of a saved domain's XML (libvirt's own
/// output, so plain text search is enough: the first `<name>` and `<uuid>`
/// are the domain's, they come before any device).
fn saved_identity(xml: &str) -> Option<SavedIdentity> {
    let between = |open: &str, close: &str| -> Option<String> {
        let start = xml.find(open)? + open.len();
        let len = xml[start..].find(close)?;
        Some(xml[start..start + len].trim().to_owned())
    };
    let virt_type = match between("<domain type='", "'")?.as_str() {
        "kvm" => VirtType::Kvm,
        "qemu" => VirtType::Qemu,
        _ => return None,
    };
    Some(SavedIdentity {
        name: between("<name>", "</name>")?,
        uuid: between("<uuid>", "</uuid>")?,
        virt_type,
    })
}

/// `xml` with `<uuid>` right after its `<name>` element.
fn with_uuid(xml: &str, uuid: &str) -> String {
    match xml.find("</name>") {
        Some(i) => {
            let at = i + "</name>".len();
            format!(
                "{}\n  <uuid>{}</uuid>{}",
                &xml[..at],
                xml_escape(uuid),
                &xml[at..]
            )
        }
        None => xml.to_owned(),
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn a_saved_domain_xml_gives_its_name_uuid_and_type() {
        let xml = "<domain type='qemu' id='3'>\n  <name>sg-a-1</name>\n  <uuid>f3b93d02-f687-4292-83d3-401816786291</uuid>\n  <devices><disk><name>x</name></disk></devices></domain>";
        assert_eq!(
            saved_identity(xml),
            Some(SavedIdentity {
                name: "sg-a-1".into(),
                uuid: "f3b93d02-f687-4292-83d3-401816786291".into(),
                virt_type: VirtType::Qemu,
            })
        );
        assert_eq!(
            saved_identity("<domain type='kvm'><name>a</name></domain>"),
            None
        );
        assert_eq!(
            saved_identity("<domain type='xen'><name>a</name><uuid>u</uuid></domain>"),
            None
        );
    }

    #[test]
    fn the_uuid_goes_after_the_name() {
        assert_eq!(
            with_uuid("<domain>\n  <name>n</name>\n  <memory/>", "u-1"),
            "<domain>\n  <name>n</name>\n  <uuid>u-1</uuid>\n  <memory/>"
        );
    }
}
