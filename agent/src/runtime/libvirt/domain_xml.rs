//! Grid VM domain XML: the pure [`render_domain_xml`] function, the
//! sparegrid metadata namespace, the host-side paths of a grid VM's console
//! log and guest channel socket, and a tolerant reader for the owner that
//! [`render_domain_xml`] writes into the metadata.
//!
//! Nothing here talks to libvirt, so everything is unit-tested on strings.
//! Every interpolated string is XML-escaped.

use std::path::{Path, PathBuf};

use crate::runtime::VmSpec;

use super::{LibvirtOptions, VirtType};

/// Namespace URI of the `<metadata>` element that marks a domain as a
/// sparegrid grid VM. Domains without it are never listed or touched.
pub const METADATA_NS: &str = "https://sparegrid.dev/xml/vm/1";
/// Prefix used for [`METADATA_NS`] in the rendered XML.
pub const METADATA_PREFIX: &str = "sparegrid";
/// Name of the virtio-serial port the guest worker opens
/// (`/dev/virtio-ports/org.sparegrid.guest.0` inside the guest).
pub const GUEST_CHANNEL_NAME: &str = "org.sparegrid.guest.0";

/// `<run_dir>/<name>.console.log`: the guest's serial console (ttyS0).
pub fn console_log_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.console.log"))
}

/// `<run_dir>/<name>.channel.sock`: the host end of the guest channel
/// (QEMU listens, the agent connects).
pub fn channel_socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.channel.sock"))
}

/// Escapes `&`, `<`, `>`, `"` and `'` so the text is safe in element content
/// and in attribute values of either quote style.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`xml_escape`] (and the numeric character references libvirt may
/// write when it serialises metadata back).
fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The sparegrid metadata element as [`render_domain_xml`] embeds it and as
/// `virDomainSetMetadata` would accept it.
pub fn metadata_element(owner: &str) -> String {
    format!(
        "<{p}:vm xmlns:{p}=\"{ns}\"><{p}:owner>{owner}</{p}:owner></{p}:vm>",
        p = METADATA_PREFIX,
        ns = METADATA_NS,
        owner = xml_escape(owner),
    )
}

/// The owner recorded in a sparegrid metadata element, as returned by
/// `virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)`.
/// libvirt re-serialises the element and may pick another prefix (or none),
/// so this looks for an `owner` element under any prefix.
/// `None` if the element has no owner.
pub fn parse_owner(metadata_xml: &str) -> Option<String> {
    let mut rest = metadata_xml;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let tag_end = rest.find('>')?;
        let tag = &rest[..tag_end];
        let name = tag.split_whitespace().next().unwrap_or("");
        let local = name.rsplit(':').next().unwrap_or(name);
        if tag.starts_with('/') || tag.ends_with('/') || local != "owner" {
            continue;
        }
        let body = &rest[tag_end + 1..];
        let close = body.find('<')?;
        return Some(xml_unescape(&body[..close]));
    }
    None
}

/// Renders the domain XML for one grid VM.
///
/// - `type` is the resolved `kvm` or `qemu` (TCG);
/// - direct kernel boot (`kernel`, `initrd`, `cmdline`), x86_64 `pc` machine
///   with ACPI (PCI hot-plug of the overlay NIC needs it);
/// - `<cputune><shares>2</shares>`: the lowest CPU weight libvirt sets on the
///   domain's own cgroup (cgroup v2: `cpu.weight`), so customers always win;
/// - optional `<resource><partition>` (an absolute libvirt partition path);
/// - power-off, reboot and crash all end in `destroy`: a grid VM never
///   restarts by itself, the agent reconciles a stopped one;
/// - serial console to `<run_dir>/<name>.console.log`, the virtio-serial
///   guest channel at `<run_dir>/<name>.channel.sock`;
/// - no network interface, no USB controller, no memory balloon;
/// - the sparegrid metadata element with the owning host.
///
/// `spec.command` is ignored: it belongs to the process runtime.
pub fn render_domain_xml(spec: &VmSpec, opts: &LibvirtOptions, virt_type: VirtType) -> String {
    let esc_path = |p: &Path| xml_escape(&p.to_string_lossy());
    let console = esc_path(&console_log_path(&opts.run_dir, &spec.name));
    let channel = esc_path(&channel_socket_path(&opts.run_dir, &spec.name));
    let mut x = String::with_capacity(2048);
    x.push_str(&format!("<domain type='{}'>\n", virt_type.as_str()));
    x.push_str(&format!("  <name>{}</name>\n", xml_escape(&spec.name)));
    x.push_str("  <metadata>\n    ");
    x.push_str(&metadata_element(&opts.owner));
    x.push_str("\n  </metadata>\n");
    x.push_str(&format!(
        "  <memory unit='MiB'>{m}</memory>\n  <currentMemory unit='MiB'>{m}</currentMemory>\n",
        m = spec.memory_mib
    ));
    x.push_str(&format!(
        "  <vcpu placement='static'>{}</vcpu>\n",
        spec.vcpus
    ));
    x.push_str("  <cputune>\n    <shares>2</shares>\n  </cputune>\n");
    if let Some(partition) = &opts.partition {
        x.push_str(&format!(
            "  <resource>\n    <partition>{}</partition>\n  </resource>\n",
            xml_escape(partition)
        ));
    }
    x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
    x.push_str(&format!(
        "    <kernel>{}</kernel>\n",
        esc_path(&spec.kernel)
    ));
    if !spec.initrd.as_os_str().is_empty() {
        x.push_str(&format!(
            "    <initrd>{}</initrd>\n",
            esc_path(&spec.initrd)
        ));
    }
    x.push_str(&format!(
        "    <cmdline>{}</cmdline>\n  </os>\n",
        xml_escape(&spec.cmdline)
    ));
    // ACPI: without it the `pc` machine's PCI bus takes no hot-plug, and
    // an overlay subtask's NIC is hot-plugged (overlay::LibvirtNics).
    x.push_str("  <features>\n    <acpi/>\n  </features>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n");
    x.push_str("  <on_reboot>destroy</on_reboot>\n");
    x.push_str("  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    if let Some(emulator) = &opts.emulator {
        x.push_str(&format!(
            "    <emulator>{}</emulator>\n",
            esc_path(emulator)
        ));
    }
    x.push_str(&format!(
        "    <serial type='file'>\n      <source path='{console}'/>\n      <target port='0'/>\n    </serial>\n"
    ));
    x.push_str(&format!(
        "    <console type='file'>\n      <source path='{console}'/>\n      <target type='serial' port='0'/>\n    </console>\n"
    ));
    x.push_str(&format!(
        "    <channel type='unix'>\n      <source mode='bind' path='{channel}'/>\n      <target type='virtio' name='{}'/>\n    </channel>\n",
        xml_escape(GUEST_CHANNEL_NAME)
    ));
    x.push_str("    <controller type='usb' model='none'/>\n");
    x.push_str("    <memballoon model='none'/>\n");
    x.push_str("  </devices>\n</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DomainType;

    fn spec() -> VmSpec {
        VmSpec {
            name: "sg-host1-0".into(),
            vcpus: 2,
            memory_mib: 384,
            kernel: PathBuf::from("/var/lib/sparegrid/images/default/vmlinuz"),
            initrd: PathBuf::from("/var/lib/sparegrid/images/default/initrd.img"),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
            command: vec![],
            force_tcg: false,
        }
    }

    fn opts() -> LibvirtOptions {
        LibvirtOptions {
            save_dir: PathBuf::from("/var/lib/libvirt/qemu/save"),
            domain_type: DomainType::Auto,
            emulator: None,
            owner: "host1".into(),
            run_dir: PathBuf::from("/run/sparegrid"),
            partition: None,
            cgroup_root: None,
            partition_memory_max_bytes: None,
        }
    }

    #[test]
    fn renders_type_name_sizes_and_boot() {
        let x = render_domain_xml(&spec(), &opts(), VirtType::Kvm);
        assert!(x.starts_with("<domain type='kvm'>\n"), "{x}");
        assert!(x.contains("<name>sg-host1-0</name>"));
        assert!(x.contains("<memory unit='MiB'>384</memory>"));
        assert!(x.contains("<currentMemory unit='MiB'>384</currentMemory>"));
        assert!(x.contains("<vcpu placement='static'>2</vcpu>"));
        assert!(x.contains("<type arch='x86_64' machine='pc'>hvm</type>"));
        assert!(x.contains("<features>\n    <acpi/>\n  </features>"));
        assert!(x.contains("<kernel>/var/lib/sparegrid/images/default/vmlinuz</kernel>"));
        assert!(x.contains("<initrd>/var/lib/sparegrid/images/default/initrd.img</initrd>"));
        assert!(x.contains("<cmdline>console=ttyS0 quiet panic=-1</cmdline>"));
        let q = render_domain_xml(&spec(), &opts(), VirtType::Qemu);
        assert!(q.starts_with("<domain type='qemu'>\n"), "{q}");
    }

    #[test]
    fn lowest_weight_no_network_no_balloon_and_destroy_on_exit() {
        let x = render_domain_xml(&spec(), &opts(), VirtType::Qemu);
        assert!(x.contains("<cputune>\n    <shares>2</shares>\n  </cputune>"));
        assert!(!x.contains("<interface"), "grid VMs get no network: {x}");
        assert!(x.contains("<memballoon model='none'/>"));
        assert!(x.contains("<on_poweroff>destroy</on_poweroff>"));
        assert!(x.contains("<on_crash>destroy</on_crash>"));
        assert!(x.contains("<on_reboot>destroy</on_reboot>"));
        assert!(!x.contains("<resource>"), "no partition unless asked");
        assert!(
            !x.contains("<emulator>"),
            "libvirt picks the emulator by default"
        );
    }

    #[test]
    fn console_and_channel_live_in_run_dir() {
        let x = render_domain_xml(&spec(), &opts(), VirtType::Qemu);
        assert!(x.contains(
            "<serial type='file'>\n      <source path='/run/sparegrid/sg-host1-0.console.log'/>"
        ));
        assert!(x.contains(
            "<console type='file'>\n      <source path='/run/sparegrid/sg-host1-0.console.log'/>"
        ));
        assert!(x.contains(
            "<channel type='unix'>\n      <source mode='bind' path='/run/sparegrid/sg-host1-0.channel.sock'/>\n      <target type='virtio' name='org.sparegrid.guest.0'/>"
        ));
        assert_eq!(
            channel_socket_path(Path::new("/r"), "a"),
            PathBuf::from("/r/a.channel.sock")
        );
        assert_eq!(
            console_log_path(Path::new("/r"), "a"),
            PathBuf::from("/r/a.console.log")
        );
    }

    #[test]
    fn metadata_names_the_owner() {
        let x = render_domain_xml(&spec(), &opts(), VirtType::Qemu);
        assert!(x.contains(
            "<metadata>\n    <sparegrid:vm xmlns:sparegrid=\"https://sparegrid.dev/xml/vm/1\"><sparegrid:owner>host1</sparegrid:owner></sparegrid:vm>\n  </metadata>"
        ), "{x}");
    }

    #[test]
    fn partition_and_emulator_when_given() {
        let mut o = opts();
        o.partition = Some("/sparegrid".into());
        o.emulator = Some(PathBuf::from("/usr/bin/qemu-system-x86_64"));
        let x = render_domain_xml(&spec(), &o, VirtType::Qemu);
        assert!(x.contains("<resource>\n    <partition>/sparegrid</partition>\n  </resource>"));
        assert!(x.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
    }

    #[test]
    fn every_interpolated_string_is_escaped() {
        let mut s = spec();
        s.name = "a<b>&'\"".into();
        s.kernel = PathBuf::from("/k&<'>");
        s.initrd = PathBuf::from("/i\"&");
        s.cmdline = "x=<1> & y='2' \"z\"".into();
        let mut o = opts();
        o.owner = "h&<o>'\"".into();
        o.run_dir = PathBuf::from("/run/s'g&");
        o.partition = Some("/p&<".into());
        o.emulator = Some(PathBuf::from("/e'<"));
        let x = render_domain_xml(&s, &o, VirtType::Kvm);
        assert!(
            x.contains("<name>a&lt;b&gt;&amp;&apos;&quot;</name>"),
            "{x}"
        );
        assert!(x.contains("<kernel>/k&amp;&lt;&apos;&gt;</kernel>"));
        assert!(x.contains("<initrd>/i&quot;&amp;</initrd>"));
        assert!(x.contains("<cmdline>x=&lt;1&gt; &amp; y=&apos;2&apos; &quot;z&quot;</cmdline>"));
        assert!(x.contains("<sparegrid:owner>h&amp;&lt;o&gt;&apos;&quot;</sparegrid:owner>"));
        assert!(x.contains("path='/run/s&apos;g&amp;/a&lt;b&gt;&amp;&apos;&quot;.console.log'"));
        assert!(x.contains("<partition>/p&amp;&lt;</partition>"));
        assert!(x.contains("<emulator>/e&apos;&lt;</emulator>"));
        // Nothing raw slipped through: every '&' starts an entity.
        for (i, _) in x.match_indices('&') {
            let tail = &x[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| tail.starts_with(e)),
                "raw & at {i}: {tail:.20}"
            );
        }
    }

    #[test]
    fn empty_initrd_is_left_out() {
        let mut s = spec();
        s.initrd = PathBuf::new();
        let x = render_domain_xml(&s, &opts(), VirtType::Qemu);
        assert!(!x.contains("<initrd>"));
    }

    #[test]
    fn owner_round_trips_through_metadata() {
        for owner in ["host1", "h&<o>'\"", "ünï", ""] {
            assert_eq!(
                parse_owner(&metadata_element(owner)).as_deref(),
                Some(owner),
                "{owner}"
            );
        }
    }

    #[test]
    fn owner_parses_as_libvirt_serialises_it() {
        // libvirt returns the element re-serialised; the prefix may differ.
        let x = "<sparegrid:vm xmlns:sparegrid=\"https://sparegrid.dev/xml/vm/1\">\n  <sparegrid:owner>h&amp;st</sparegrid:owner>\n</sparegrid:vm>";
        assert_eq!(parse_owner(x).as_deref(), Some("h&st"));
        let y = "<vm xmlns=\"https://sparegrid.dev/xml/vm/1\"><owner>h&#38;x&#x41;</owner></vm>";
        assert_eq!(parse_owner(y).as_deref(), Some("h&xA"));
        assert_eq!(parse_owner("<sparegrid:vm xmlns:sparegrid=\"u\"/>"), None);
        assert_eq!(
            parse_owner("<sparegrid:vm><sparegrid:owner/></sparegrid:vm>"),
            None
        );
        assert_eq!(parse_owner(""), None);
    }

    #[test]
    fn unescape_leaves_unknown_entities() {
        assert_eq!(xml_unescape("a&bogus;b&c"), "a&bogus;b&c");
        assert_eq!(xml_unescape("&lt;&gt;&quot;&apos;&amp;"), "<>\"'&");
    }
}
