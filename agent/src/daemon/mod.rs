//! The `sparegrid-agent` daemon: wires config, cgroup partition, runtime,
//! control loop, HTTP server, signals and systemd together.
//!
//! Threads: the control loop (every blocking runtime call), a signal thread
//! (SIGTERM/SIGINT drain and stop, SIGHUP reloads the config) and a small
//! tokio runtime for HTTP. With a controller configured, the grid client's
//! threads too ([`crate::grid`]): the signal thread tells it at once to hand
//! its subtasks back on SIGTERM, and passes a reloaded config on SIGHUP.
//!
//! With `[tunnel] enabled` (which needs a controller) the host key is
//! loaded (or generated) at start and a [`crate::tunnel::TunnelService`]
//! and a [`crate::overlay::HostNet`] (the grid bridge, forwarding from the
//! TUN device) are handed to the grid client, which brings them up on the
//! controller's lease and applies its peer lists; status and metrics show
//! the tunnel. On the way out the tunnel goes after the grid client has
//! stopped, then the bridge. `[tunnel]` changes need a restart.

pub mod boost;
pub mod control;
pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;
pub mod worker;

#[cfg(test)]
mod control_tests;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use sparegrid_proto::AgentStatus;

use crate::cgroup::{CgroupError, GridCgroup, PartitionLimits};
use crate::config::{Config, RuntimeKind};
use crate::runtime::{Runtime, RuntimeError};
use crate::sampler::SampleError;

use control::{Command, ControlLoop};
use status::Shared;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("sampler: {0}")]
    Sampler(#[from] SampleError),
    #[error("runtime: {0}")]
    Runtime(RuntimeError),
    #[error("grid cgroup partition: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the {0} runtime is not compiled into this build")]
    NotBuilt(&'static str),
    #[error("workload: {0}")]
    Workload(#[from] crate::workload::WorkloadError),
    #[error("finding the controller: {0}")]
    Discover(#[from] crate::discover::DiscoverError),
    #[error("transfer endpoint: {0}")]
    Transfer(#[from] crate::transfer::TransferError),
    #[error("image catalog: {0}")]
    Image(#[from] crate::images::ImageError),
    #[error("tunnel: {0}")]
    Tunnel(#[from] crate::tunnel::ServiceError),
    #[error("overlay: {0}")]
    Overlay(#[from] crate::overlay::OverlayError),
}

/// This host's name: the config's `agent.host_name`, or the kernel's.
pub fn host_name(cfg: &Config) -> String {
    if !cfg.agent.host_name.is_empty() {
        return cfg.agent.host_name.clone();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn ensure_dir(path: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(path).map_err(|source| DaemonError::Dir {
        path: path.to_path_buf(),
        source,
    })
}

/// The cgroup directory name of the grid partition. With libvirt on a host
/// without systemd, libvirt places VMs under `<partition>.partition`; the
/// agent manages that same directory, so the usage it reads (memory, CPU
/// stall) is the VMs' own.
pub fn partition_dir_name(cfg: &Config) -> String {
    #[cfg(feature = "libvirt")]
    if cfg.runtime.kind == RuntimeKind::Libvirt {
        use crate::runtime::libvirt::{libvirt_partition_dir, LibvirtOptions};
        let opts = LibvirtOptions::from_config(cfg, "");
        if let (Some(_), Some(p)) = (opts.cgroup_root, opts.partition) {
            return libvirt_partition_dir(&p).to_string_lossy().into_owned();
        }
    }
    cfg.cgroup.partition.clone()
}

/// Sets up the grid partition: the lowest CPU weight and the memory ceiling.
pub fn setup_cgroup(cfg: &Config) -> Result<Arc<GridCgroup>, DaemonError> {
    let name = partition_dir_name(cfg);
    let cg = GridCgroup::detect(&cfg.agent.cgroup_root, &name, cfg.cgroup.version)?;
    let applied = cg.as_partition().setup(&PartitionLimits {
        memory_max_bytes: cfg.partition_memory_max_bytes(),
    })?;
    tracing::info!(
        "grid partition {} (cgroup {}): {}",
        name,
        cg.as_partition().version(),
        applied.settings.join(", ")
    );
    Ok(Arc::new(cg))
}

/// Builds the configured runtime. Returns it and whether it can save VM state.
pub fn build_runtime(
    cfg: &Config,
    host: &str,
    cgroup: Option<Arc<GridCgroup>>,
) -> Result<(Box<dyn Runtime>, bool), DaemonError> {
    match cfg.runtime.kind {
        RuntimeKind::Process => {
            let cg = cgroup.ok_or_else(|| {
                DaemonError::Runtime(RuntimeError::Op {
                    vm: "-".into(),
                    op: "start",
                    message: "the process runtime needs the grid cgroup partition".into(),
                })
            })?;
            Ok((
                Box::new(crate::runtime::process::ProcessRuntime::new(cg)),
                false,
            ))
        }
        #[cfg(feature = "libvirt")]
        RuntimeKind::Libvirt => {
            use crate::runtime::libvirt::{LibvirtOptions, LibvirtRuntime};
            let opts = LibvirtOptions::from_config(cfg, host);
            let rt = LibvirtRuntime::connect(&cfg.runtime.libvirt_uri, opts)
                .map_err(DaemonError::Runtime)?;
            Ok((Box::new(rt), true))
        }
        #[cfg(not(feature = "libvirt"))]
        RuntimeKind::Libvirt => {
            let _ = host;
            Err(DaemonError::NotBuilt("libvirt"))
        }
    }
}

/// Loads `[vm] workload`, if set, over the `[vm]` template: the image's
/// kernel and initrd (digests checked against its manifest), vCPUs, memory
/// and command line.
pub fn apply_workload(cfg: &mut Config) -> Result<(), DaemonError> {
    if cfg.vm.workload.as_os_str().is_empty() {
        return Ok(());
    }
    let w = crate::workload::Workload::load(&cfg.vm.workload)?;
    tracing::info!(
        "workload {} from {}: {} vCPU, {} MiB, interpreters {:?}",
        w.name,
        cfg.vm.workload.display(),
        w.vcpus,
        w.memory_mib,
        w.interpreters
    );
    cfg.vm.kernel = w.kernel();
    cfg.vm.initrd = w.initrd();
    cfg.vm.vcpus = w.vcpus;
    cfg.vm.memory_mib = w.memory_mib;
    cfg.vm.cmdline = w.cmdline.clone();
    Ok(())
}

/// How often a guest worker heartbeats on its channel.
const GUEST_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// A guest silent this long while its VM runs is declared dead (TCG guests
/// on a busy host can stall for a few seconds).
const GUEST_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the agent until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub fn run(mut cfg: Config, config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    crate::discover::resolve(&mut cfg)?;
    crate::images::fetch_workload_image(&cfg)?;
    apply_workload(&mut cfg)?;
    cfg.validate()
        .map_err(|e| DaemonError::Io(std::io::Error::other(e.to_string())))?;
    let host = host_name(&cfg);
    ensure_dir(&cfg.agent.run_dir)?;
    let cgroup = match setup_cgroup(&cfg) {
        Ok(cg) => Some(cg),
        Err(e) if cfg.runtime.kind == RuntimeKind::Libvirt => {
            tracing::warn!("{e}; grid VMs run without the low-priority partition");
            None
        }
        Err(e) => return Err(e),
    };
    let (runtime, can_save) = build_runtime(&cfg, &host, cgroup.clone())?;
    let shared = Arc::new(Shared::new(AgentStatus {
        grid_net: None,
        tunnel: None,
        version: env!("CARGO_PKG_VERSION").to_string(),
        host: host.clone(),
        runtime: runtime.kind().to_string(),
        draining: false,
        load: None,
        vms: Vec::new(),
        transitions: Vec::new(),
    }));
    // With a guest channel (libvirt), subtasks run inside the grid VMs and
    // a VM counts as started once its guest worker answers.
    let pool = runtime.guest_channel("probe").is_some().then(|| {
        crate::guestlink::GuestPool::new(crate::guestlink::LinkOptions {
            spill: cfg
                .controller
                .enabled()
                .then(|| crate::guestlink::GuestSpill {
                    dir: crate::grid::outputs::spill_dir(&cfg.agent.data_dir),
                    max_output_bytes: cfg.controller.max_output_bytes,
                }),
            host: host.clone(),
            hello_timeout: cfg.policy.boot_timeout,
            heartbeat: GUEST_HEARTBEAT,
            dead_after: GUEST_DEAD_AFTER,
            output_cap: crate::subtask::Limits::default().output_cap_bytes as u64,
        })
    });
    // Push dispatch: only when a controller is configured (started below,
    // once the listener is bound).
    let backend = cfg.controller.enabled().then(|| match &pool {
        Some(pool) => crate::grid::runner::Backend::Vms(pool.clone()),
        None => crate::grid::runner::Backend::Process(crate::subtask::Executor::new(
            cgroup.clone(),
            host.clone(),
            crate::subtask::Limits {
                spill_dir: Some(crate::grid::outputs::spill_dir(&cfg.agent.data_dir)),
                max_output_bytes: cfg.controller.max_output_bytes,
                ..crate::subtask::Limits::default()
            },
        )),
    });
    let grid_host = host.clone();
    let mut control =
        ControlLoop::new(cfg.clone(), host, runtime, can_save, cgroup, shared.clone())?;
    if let Some(pool) = pool {
        control = control.with_guest_pool(pool);
    }

    // Bind before starting anything so a busy port fails the start cleanly.
    let listener =
        std::net::TcpListener::bind(cfg.agent.listen).map_err(|source| DaemonError::Listen {
            addr: cfg.agent.listen,
            source,
        })?;
    listener.set_nonblocking(true)?;
    tracing::info!("status and metrics on http://{}", cfg.agent.listen);
    let overlay = overlay_parts(&cfg)?;
    if let Some(t) = &overlay.tunnel {
        shared.set_tunnel(t.clone());
    }
    if let Some(h) = &overlay.host_net {
        shared.set_host_net(h.clone());
    }
    // The transfer endpoint's state: served on its own listener below,
    // where saved VMs from other hosts arrive, and where this host's grid
    // VM image is served to peers (published before the grid client
    // registers it).
    let transfer_state = if cfg.transfer.enabled {
        let state = crate::transfer::TransferState::new(
            &cfg.transfer,
            &cfg.agent.data_dir,
            cfg.controller.token.as_bytes(),
        )?;
        shared.metrics.set_transfer(state.clone());
        if let Some(dir) = crate::images::workload_image_dir(&cfg) {
            crate::images::publish(&state, &dir)?;
        }
        Some(state)
    } else {
        None
    };
    let grid = match backend {
        Some(b) => Some(crate::grid::Grid::start_with_overlay(
            &cfg,
            &grid_host,
            b,
            shared.clone(),
            overlay.clone(),
        )?),
        None => None,
    };

    let (tx, rx) = mpsc::channel::<Command>();
    // reclaim_mode = "migrate" sends saved VMs away; grid VM hosts with a
    // transfer endpoint take them in (crate::migrate).
    let sends = crate::migrate::sends(&cfg);
    let mut migrate_routes = None;
    if let Some(g) = &grid {
        if sends || crate::migrate::accepts(&cfg) {
            let setup = Arc::new(crate::migrate::MigrateSetup::of(
                &cfg,
                &grid_host,
                transfer_state.clone(),
            ));
            if let (true, Some(t)) = (crate::migrate::accepts(&cfg), &transfer_state) {
                migrate_routes = Some(crate::migrate::incoming::routes(
                    setup.clone(),
                    t.clone(),
                    tx.clone(),
                ));
                crate::migrate::incoming::spawn_sweeper(
                    t.clone(),
                    cfg.transfer.upload_expiry,
                    crate::migrate::SWEEP_EVERY,
                );
            }
            control = control.with_migration(control::Migration::new(
                setup,
                g.runner().clone(),
                tx.clone(),
                sends,
            ));
        }
    }
    spawn_signal_thread(
        tx.clone(),
        config_path,
        grid.as_ref().map(|g| g.handle()),
        cfg.tunnel.clone(),
    )?;
    let control = std::thread::Builder::new()
        .name("sparegrid-control".into())
        .spawn(move || control.run(rx))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut app = http::router(shared.clone(), tx);
    if let Some(g) = &grid {
        app = app.merge(g.routes());
    }
    if let Some(r) = migrate_routes {
        app = app.merge(r);
    }
    // The transfer endpoint on its own listener, stopped with the server.
    let (transfer_stop, transfer_stopped) = tokio::sync::oneshot::channel::<()>();
    let transfer = if let Some(state) = transfer_state {
        let addr = cfg.transfer.listen;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| crate::transfer::TransferError::Bind { addr, source })?;
        tracing::info!("transfer endpoint on {addr}");
        Some(rt.spawn(crate::transfer::serve_on(listener, state, async {
            let _ = transfer_stopped.await;
        })))
    } else {
        None
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    // The control loop ends on Shutdown; then stop serving.
    let result = control.join().unwrap_or_else(|_| {
        Err(DaemonError::Io(std::io::Error::other(
            "control loop panicked",
        )))
    });
    let _ = stop_tx.send(());
    let _ = transfer_stop.send(());
    let _ = rt.block_on(server);
    if let Some(t) = transfer {
        match rt.block_on(t) {
            Ok(Err(e)) => tracing::error!("transfer endpoint: {e}"),
            Err(e) => tracing::error!("transfer endpoint task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(g) = grid {
        g.stop();
    }
    stop_overlay(&overlay);
    tracing::info!("stopped");
    result
}

/// With `[tunnel] enabled`: the tunnel service (its key loaded or made
/// now, so a bad key file fails the start), the host's grid bridge, which
/// forwards from the TUN device, and on the libvirt runtime the NIC
/// hot-plug for grid VMs. Nothing runs until the lease.
pub fn overlay_parts(cfg: &Config) -> Result<crate::grid::OverlayParts, DaemonError> {
    if !cfg.tunnel.enabled {
        return Ok(crate::grid::OverlayParts::default());
    }
    let tunnel = crate::tunnel::TunnelService::new(&cfg.tunnel, &cfg.agent.data_dir)?;
    let host_net =
        crate::overlay::HostNet::new(&cfg.overlay)?.forward_from(&[cfg.tunnel.interface.as_str()]);
    // Grid VMs get their overlay NIC hot-plugged through libvirt.
    let vm_nics: Option<Arc<dyn crate::overlay::NicPlug>> = match cfg.runtime.kind {
        #[cfg(feature = "libvirt")]
        RuntimeKind::Libvirt => Some(Arc::new(crate::overlay::LibvirtNics::new(
            &cfg.runtime.libvirt_uri,
        ))),
        _ => None,
    };
    Ok(crate::grid::OverlayParts {
        tunnel: Some(Arc::new(tunnel)),
        host_net: Some(Arc::new(host_net)),
        vm_nics,
    })
}

/// Stops the tunnel (device and routes go with it) and removes the grid
/// bridge and its filtering.
fn stop_overlay(overlay: &crate::grid::OverlayParts) {
    if let Some(t) = &overlay.tunnel {
        t.shutdown();
    }
    if let Some(h) = &overlay.host_net {
        if let Err(e) = h.teardown() {
            tracing::warn!("overlay teardown: {e}");
        }
    }
}

fn spawn_signal_thread(
    tx: mpsc::Sender<Command>,
    config_path: Option<PathBuf>,
    grid: Option<crate::grid::GridHandle>,
    tunnel: crate::tunnel::AgentTunnelSection,
) -> Result<(), DaemonError> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("sparegrid-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match sig {
                    SIGHUP => match &config_path {
                        Some(path) => match Config::load(path).and_then(|mut cfg| {
                            // A controller found through DNS may have moved.
                            if let Err(e) = crate::discover::resolve(&mut cfg) {
                                tracing::warn!("SIGHUP: {e}");
                            }
                            cfg.validate()?;
                            Ok(cfg)
                        }) {
                            Ok(cfg) => {
                                if cfg.tunnel != tunnel {
                                    tracing::warn!(
                                        "SIGHUP: [tunnel] changed; that needs a restart, keeping the running tunnel"
                                    );
                                }
                                match &grid {
                                    Some(g) => {
                                        g.reload(&cfg);
                                    }
                                    None if cfg.controller.enabled() => tracing::warn!(
                                        "SIGHUP: joining a controller (controller.url) needs a restart"
                                    ),
                                    None => {}
                                }
                                let _ = tx.send(Command::Reload(Box::new(cfg)));
                            }
                            Err(e) => tracing::error!("SIGHUP: keeping the current config: {e}"),
                        },
                        None => {
                            tracing::warn!("SIGHUP: no config file to reload (running on defaults)")
                        }
                    },
                    _ => {
                        tracing::info!("signal {sig}: draining and stopping");
                        if let Some(g) = &grid {
                            g.begin_shutdown();
                        }
                        let _ = tx.send(Command::Shutdown);
                        return;
                    }
                }
            }
        })?;
    Ok(())
}
