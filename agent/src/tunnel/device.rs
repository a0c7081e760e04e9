//! The packet device under the tunnel: the [`TunIo`] trait that the
//! endpoint reads plaintext packets from and writes them to, in batches;
//! the real Linux TUN device behind it ([`TunDevice`], the `tun-rs` crate,
//! with wireguard-go's GSO/GRO offload: one read can carry a 64 KiB TCP
//! super-packet that is split here, and written packets of one flow are
//! coalesced again before the write), its routes (`ip route`), and an
//! in-memory device for tests ([`MemTun`]).

use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Bytes in front of every packet of a [`WriteBatch`]: room for the
/// virtio-net header that offload writes carry.
pub const HEADROOM: usize = VIRTIO_NET_HDR_LEN;
/// Packets per batch.
pub const BATCH: usize = IDEAL_BATCH_SIZE;
/// Capacity of each write buffer: GRO appends a flow's packets to the
/// first one's buffer, up to 64 KiB, and tun-rs coalesces only into a
/// buffer that already has the capacity (without it nothing coalesces and
/// every packet is its own write).
const WRITE_CAPACITY: usize = 2 * HEADROOM + 65535;

/// A TUN device that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("create TUN device {name}: {source}")]
    Create { name: String, source: io::Error },
    #[error("TUN device {name}: {what}: {message}")]
    Setup {
        name: String,
        what: String,
        message: String,
    },
}

/// Packets read from the device: packet `i` is `bufs[i][..sizes[i]]`.
pub struct ReadBatch {
    pub bufs: Vec<Vec<u8>>,
    pub sizes: Vec<usize>,
    /// The raw read (virtio-net header and a super-packet) before splitting.
    original: Vec<u8>,
}

impl ReadBatch {
    pub fn new(mtu: usize) -> ReadBatch {
        ReadBatch {
            bufs: vec![vec![0u8; mtu.max(1500) + 64]; BATCH],
            sizes: vec![0; BATCH],
            original: vec![0u8; HEADROOM + 65535],
        }
    }
}

/// Packets to write: packet `i` is `bufs[i][HEADROOM..]` (each buffer's
/// length ends where its packet ends).
pub struct WriteBatch {
    pub bufs: Vec<Vec<u8>>,
    pub count: usize,
    gro: GROTable,
}

impl Default for WriteBatch {
    fn default() -> Self {
        WriteBatch {
            bufs: Vec::with_capacity(BATCH),
            count: 0,
            gro: GROTable::default(),
        }
    }
}

impl WriteBatch {
    /// The next free buffer, `HEADROOM + room` bytes long; the caller
    /// writes the packet at `HEADROOM..` and calls [`WriteBatch::commit`].
    pub fn slot(&mut self, room: usize) -> &mut [u8] {
        if self.count == self.bufs.len() {
            self.bufs
                .push(Vec::with_capacity(WRITE_CAPACITY.max(HEADROOM + room)));
        }
        let b = &mut self.bufs[self.count];
        let want = HEADROOM + room;
        // No zero-filling of the packet area (decryption overwrites it).
        if b.len() < want {
            b.resize(want, 0);
        } else {
            b.truncate(want);
        }
        // tun-rs writes the virtio header only for coalesced packets and
        // for packets that are no GRO candidates; others rely on a zeroed
        // one, and a reused buffer may hold a GSO header from its last use.
        b[..HEADROOM].fill(0);
        &mut b[HEADROOM..]
    }

    /// Keeps the packet of `len` bytes just written into [`WriteBatch::slot`].
    pub fn commit(&mut self, len: usize) {
        self.bufs[self.count].truncate(HEADROOM + len);
        self.count += 1;
    }

    pub fn is_full(&self) -> bool {
        self.count >= BATCH
    }

    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.count].iter().map(|b| &b[HEADROOM..])
    }
}

/// Where plaintext packets come from and go to.
pub trait TunIo: Send + Sync + 'static {
    /// Waits up to `timeout` for packets; returns how many were read into
    /// `batch` (0 when none came).
    fn read(&self, batch: &mut ReadBatch, timeout: Duration) -> io::Result<usize>;
    /// Writes `batch.count` packets and empties the batch.
    fn write(&self, batch: &mut WriteBatch) -> io::Result<()>;
}

/// Waits until `fd` is readable or `timeout` passes; true when readable.
pub(crate) fn poll_in(fd: i32, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Waits until `fd` is writable (or `timeout` passes).
pub(crate) fn poll_out(fd: i32, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: as above.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A Linux TUN device with its address set and its link up.
pub struct TunDevice {
    dev: SyncDevice,
    name: String,
}

impl TunDevice {
    /// Creates `name` with `address` (its prefix is routed into the
    /// device by the kernel), `mtu`, optionally GSO/GRO offload, and
    /// brings it up. IPv6 is turned off on it (no router solicitations
    /// into the tunnel).
    pub fn create(
        name: &str,
        address: IpNet,
        mtu: u16,
        offload: bool,
    ) -> Result<TunDevice, DeviceError> {
        let IpNet::V4(v4) = address else {
            return Err(DeviceError::Setup {
                name: name.into(),
                what: "address".into(),
                message: format!("{address} is not IPv4"),
            });
        };
        let dev = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .ipv4(v4.addr(), v4.prefix_len(), None)
            .enable(true)
            .build_sync()
            .map_err(|source| DeviceError::Create {
                name: name.into(),
                source,
            })?;
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        tracing::info!(%name, %address, mtu, offload, tcp_gso = dev.tcp_gso(), "TUN device up");
        Ok(TunDevice { dev, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Routes `net` into this device unless the device's own prefix
    /// already covers it (`ip route replace`).
    pub fn add_route(&self, net: &IpNet) -> Result<(), DeviceError> {
        ip(&["route", "replace", &net.to_string(), "dev", &self.name]).map_err(|message| {
            DeviceError::Setup {
                name: self.name.clone(),
                what: format!("route {net}"),
                message,
            }
        })
    }

    /// Removes the route for `net` through this device (best effort: a
    /// route that is already gone is fine).
    pub fn remove_route(&self, net: &IpNet) {
        let _ = ip(&["route", "del", &net.to_string(), "dev", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TunIo for TunDevice {
    fn read(&self, batch: &mut ReadBatch, timeout: Duration) -> io::Result<usize> {
        if !poll_in(self.dev.as_raw_fd(), timeout)? {
            return Ok(0);
        }
        match self
            .dev
            .recv_multiple(&mut batch.original, &mut batch.bufs, &mut batch.sizes, 0)
        {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn write(&self, batch: &mut WriteBatch) -> io::Result<()> {
        let n = batch.count;
        batch.count = 0;
        if n == 0 {
            return Ok(());
        }
        self.dev
            .send_multiple(&mut batch.gro, &mut batch.bufs[..n], HEADROOM)
            .map(|_| ())
    }
}

/// An in-memory device for tests: what [`MemTun::inject`] puts in is read
/// by the endpoint, what the endpoint writes comes out of
/// [`MemTun::take`].
pub struct MemTun {
    to_endpoint: Mutex<mpsc::Sender<Vec<u8>>>,
    from_test: Mutex<mpsc::Receiver<Vec<u8>>>,
    to_test: Mutex<mpsc::Sender<Vec<u8>>>,
    from_endpoint: Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl Default for MemTun {
    fn default() -> Self {
        let (a_tx, a_rx) = mpsc::channel();
        let (b_tx, b_rx) = mpsc::channel();
        MemTun {
            to_endpoint: Mutex::new(a_tx),
            from_test: Mutex::new(a_rx),
            to_test: Mutex::new(b_tx),
            from_endpoint: Mutex::new(b_rx),
        }
    }
}

impl MemTun {
    /// A packet "sent by the kernel" into the tunnel.
    pub fn inject(&self, packet: Vec<u8>) {
        let _ = self.to_endpoint.lock().expect("lock").send(packet);
    }

    /// The next packet the endpoint delivered, waiting up to `timeout`.
    pub fn take(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.from_endpoint
            .lock()
            .expect("lock")
            .recv_timeout(timeout)
            .ok()
    }
}

impl TunIo for MemTun {
    fn read(&self, batch: &mut ReadBatch, timeout: Duration) -> io::Result<usize> {
        let rx = self.from_test.lock().expect("lock");
        let mut n = 0;
        if let Ok(p) = rx.recv_timeout(timeout) {
            batch.bufs[0][..p.len()].copy_from_slice(&p);
            batch.sizes[0] = p.len();
            n = 1;
            while n < batch.bufs.len() {
                let Ok(p) = rx.try_recv() else { break };
                batch.bufs[n][..p.len()].copy_from_slice(&p);
                batch.sizes[n] = p.len();
                n += 1;
            }
        }
        Ok(n)
    }

    fn write(&self, batch: &mut WriteBatch) -> io::Result<()> {
        let tx = self.to_test.lock().expect("lock");
        for p in batch.packets() {
            let _ = tx.send(p.to_vec());
        }
        batch.count = 0;
        Ok(())
    }
}
