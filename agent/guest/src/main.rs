//! `sparegrid-guest`: thin main; see the library's header.

use std::path::PathBuf;
use std::process::ExitCode;

use sparegrid_guest::port::PortSpec;
use sparegrid_guest::worker::{Worker, VERSION};
use sparegrid_proto::guest::PORT_NAME;

const USAGE: &str = "usage: sparegrid-guest [--port unix:PATH | --port /dev/DEVICE] \
[--sysfs-root DIR] [--dev-root DIR] [--verbose] [--version]

Without --port, finds the virtio-serial port named org.sparegrid.guest.0 under
<sysfs-root>/class/virtio-ports (default /sys) and opens <dev-root>/<vportNpM>
(default /dev), waiting until it exists. --verbose logs every subtask.";

fn main() -> ExitCode {
    match parse(std::env::args().skip(1).collect()) {
        Ok(Some(port)) => {
            // Subtasks start in WORKDIR; the worker lives there so that
            // spawning needs no chdir (see run::resolve_program).
            let _ = std::env::set_current_dir(sparegrid_guest::run::WORKDIR);
            Worker::new(port).run()
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sparegrid-guest: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// The port to use, or None when the arguments asked only for help/version.
fn parse(args: Vec<String>) -> Result<Option<PortSpec>, String> {
    let mut port = None;
    let mut sysfs = PathBuf::from("/sys");
    let mut dev = PathBuf::from("/dev");
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--port" => port = Some(PortSpec::parse(&value("--port")?).map_err(|e| e.to_string())?),
            "--sysfs-root" => sysfs = value("--sysfs-root")?.into(),
            "--dev-root" => dev = value("--dev-root")?.into(),
            "--verbose" => {
                sparegrid_guest::VERBOSE.store(true, std::sync::atomic::Ordering::Relaxed)
            }
            "--version" => {
                println!("sparegrid-guest {VERSION}");
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Some(port.unwrap_or(PortSpec::Auto {
        sysfs_root: sysfs,
        dev_root: dev,
        name: PORT_NAME.to_string(),
    })))
}
