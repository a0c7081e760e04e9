//! The overlay's address pool as arithmetic: which slices an overlay CIDR
//! holds, the lowest free one, and a slice's host address. No state: the
//! slices in use live in the store (`Store::lease_slice`), which asks
//! [`Pool::first_free`] inside its transaction.
//!
//! Slice 0 (the one at the CIDR's network address, e.g. `100.96.0.0/24`)
//! is never handed out, so no host's grid VMs sit next to the overlay's
//! network address; a `/16` with `/24` slices serves 255 hosts.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sparegrid_proto::overlay::OverlayLease;

/// The slices of one overlay CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    cidr: Ipv4Net,
    slice_prefix: u8,
}

impl Pool {
    /// `slice_prefix` must be longer than `cidr`'s and at most 30 (the
    /// config's validation checks both); `None` otherwise.
    pub fn new(cidr: Ipv4Net, slice_prefix: u8) -> Option<Pool> {
        (slice_prefix > cidr.prefix_len() && slice_prefix <= 30).then_some(Pool {
            cidr: cidr.trunc(),
            slice_prefix,
        })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub fn slice_prefix(&self) -> u8 {
        self.slice_prefix
    }

    /// Slices that can be handed out (every slice but slice 0).
    pub fn capacity(&self) -> u64 {
        (1u64 << (self.slice_prefix - self.cidr.prefix_len())) - 1
    }

    /// Slice `i`, for `i` in `1..=capacity()`.
    pub fn slice(&self, i: u64) -> Option<Ipv4Net> {
        if i == 0 || i > self.capacity() {
            return None;
        }
        let base = u32::from(self.cidr.network()) as u64;
        let addr = base + (i << (32 - self.slice_prefix));
        Ipv4Net::new(Ipv4Addr::from(addr as u32), self.slice_prefix).ok()
    }

    /// The index of `slice` when it is one of this pool's slices that can
    /// be handed out (its prefix, inside the CIDR, no host bits, not 0).
    pub fn index_of(&self, slice: &Ipv4Net) -> Option<u64> {
        if slice.prefix_len() != self.slice_prefix
            || slice.network() != slice.addr()
            || !self.cidr.contains(slice)
        {
            return None;
        }
        let offset = u32::from(slice.network()) - u32::from(self.cidr.network());
        let i = (offset >> (32 - self.slice_prefix)) as u64;
        (i != 0).then_some(i)
    }

    /// [`Pool::index_of`] for a slice as stored (`"100.96.3.0/24"`).
    pub fn index_of_str(&self, slice: &str) -> Option<u64> {
        self.index_of(&slice.parse().ok()?)
    }

    /// The lowest slice not in `used` (stored slices; ones that are not
    /// this pool's are ignored), or `None` when every slice is taken.
    /// Linear in `used`, whatever the pool's size.
    pub fn first_free<'a>(&self, used: impl IntoIterator<Item = &'a str>) -> Option<Ipv4Net> {
        let taken: BTreeSet<u64> = used
            .into_iter()
            .filter_map(|s| self.index_of_str(s))
            .collect();
        let mut want = 1u64;
        for i in taken {
            if i != want {
                break;
            }
            want += 1;
        }
        self.slice(want)
    }

    /// The host's own address in `slice`: its first usable address, with
    /// the slice's prefix length (`100.96.3.1/24`).
    pub fn host_address(slice: &Ipv4Net) -> Ipv4Net {
        let first = u32::from(slice.network()).saturating_add(1);
        Ipv4Net::new(Ipv4Addr::from(first), slice.prefix_len()).unwrap_or(*slice)
    }

    /// What the agent is told about `slice`.
    pub fn lease(&self, slice: &Ipv4Net) -> OverlayLease {
        OverlayLease {
            cidr: self.cidr.to_string(),
            slice: slice.to_string(),
            address: Pool::host_address(slice).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, prefix: u8) -> Pool {
        Pool::new(cidr.parse().unwrap(), prefix).unwrap()
    }

    #[test]
    fn slices_and_their_indices() {
        let p = pool("100.96.0.0/16", 24);
        assert_eq!(p.capacity(), 255);
        assert_eq!(p.slice(0), None, "slice 0 is kept unused");
        assert_eq!(p.slice(1).unwrap().to_string(), "100.96.1.0/24");
        assert_eq!(p.slice(255).unwrap().to_string(), "100.96.255.0/24");
        assert_eq!(p.slice(256), None);
        for i in 1..=255 {
            assert_eq!(p.index_of(&p.slice(i).unwrap()), Some(i));
        }
        assert_eq!(p.index_of_str("100.96.0.0/24"), None);
        assert_eq!(p.index_of_str("100.97.1.0/24"), None, "outside");
        assert_eq!(p.index_of_str("100.96.1.0/25"), None, "other prefix");
        assert_eq!(p.index_of_str("100.96.1.7/24"), None, "host bits");
        assert_eq!(p.index_of_str("garbage"), None);
        let small = pool("10.0.0.0/29", 30);
        assert_eq!(small.capacity(), 1);
        assert_eq!(small.slice(1).unwrap().to_string(), "10.0.0.4/30");
        assert!(Pool::new("10.0.0.0/24".parse().unwrap(), 24).is_none());
        assert!(Pool::new("10.0.0.0/24".parse().unwrap(), 31).is_none());
    }

    #[test]
    fn first_free_fills_gaps_lowest_first() {
        let p = pool("100.96.0.0/16", 24);
        assert_eq!(p.first_free([]).unwrap().to_string(), "100.96.1.0/24");
        let used = ["100.96.1.0/24", "100.96.3.0/24", "10.0.0.0/24"];
        assert_eq!(p.first_free(used).unwrap().to_string(), "100.96.2.0/24");
        let used = ["100.96.2.0/24", "100.96.1.0/24", "100.96.3.0/24"];
        assert_eq!(p.first_free(used).unwrap().to_string(), "100.96.4.0/24");
        let all: Vec<String> = (1..=255).map(|i| p.slice(i).unwrap().to_string()).collect();
        assert_eq!(p.first_free(all.iter().map(String::as_str)), None);
    }

    #[test]
    fn host_address_and_lease() {
        let p = pool("100.96.0.0/16", 24);
        let s = p.slice(3).unwrap();
        let l = p.lease(&s);
        assert_eq!(l.cidr, "100.96.0.0/16");
        assert_eq!(l.slice, "100.96.3.0/24");
        assert_eq!(l.address, "100.96.3.1/24");
        let p = pool("10.8.0.0/22", 26);
        assert_eq!(
            p.lease(&p.slice(5).unwrap()).address,
            "10.8.1.65/26",
            "slice 5 of /26s starts at 10.8.1.64"
        );
    }
}
