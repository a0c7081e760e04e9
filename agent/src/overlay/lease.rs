//! The controller's [`OverlayLease`] parsed and checked ([`Lease`]), and the
//! addresses of grid VMs and grid namespaces inside its slice
//! ([`SliceAddrs`]): the host has the first usable address, guests take the
//! lowest free one from the second on; the broadcast address is never
//! handed out.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sparegrid_proto::overlay::OverlayLease;

use super::OverlayError;

/// A checked lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The whole overlay, routed through the tunnel.
    pub cidr: Ipv4Net,
    /// This host's slice (no host bits).
    pub slice: Ipv4Net,
    /// The host's address in the slice: on the bridge, the grid's gateway.
    pub host: Ipv4Addr,
}

fn bad(field: &'static str, message: String) -> OverlayError {
    OverlayError::Lease { field, message }
}

fn net(field: &'static str, s: &str) -> Result<Ipv4Net, OverlayError> {
    s.trim()
        .parse()
        .map_err(|_| bad(field, format!("not an IPv4 CIDR: {s:?}")))
}

impl Lease {
    /// Checks the lease: `slice` inside `cidr`, at most a /30 (network,
    /// host, one guest, broadcast), `address` the slice's first usable
    /// address with the slice's prefix length.
    pub fn parse(l: &OverlayLease) -> Result<Lease, OverlayError> {
        let cidr = net("cidr", &l.cidr)?.trunc();
        let slice = net("slice", &l.slice)?;
        if slice.trunc() != slice {
            return Err(bad("slice", format!("{slice} has host bits set")));
        }
        if slice.prefix_len() > 30 {
            return Err(bad(
                "slice",
                format!("{slice} is too small: a slice needs at least a /30"),
            ));
        }
        if !cidr.contains(&slice) || slice.prefix_len() <= cidr.prefix_len() {
            return Err(bad(
                "slice",
                format!("{slice} is not a proper part of the overlay {cidr}"),
            ));
        }
        let address = net("address", &l.address)?;
        if address.prefix_len() != slice.prefix_len() || address.network() != slice.network() {
            return Err(bad(
                "address",
                format!("{address} is not an address of the slice {slice} with its prefix"),
            ));
        }
        let first = Ipv4Addr::from(u32::from(slice.network()) + 1);
        if address.addr() != first {
            return Err(bad(
                "address",
                format!("{address}: the host's address must be the slice's first ({first})"),
            ));
        }
        Ok(Lease {
            cidr,
            slice,
            host: address.addr(),
        })
    }

    /// The host bits of the slice (`0.0.0.255` for a /24).
    pub fn host_mask(&self) -> Ipv4Addr {
        self.slice.hostmask()
    }

    /// The host's address with the slice's prefix (`100.96.3.1/24`).
    pub fn host_cidr(&self) -> String {
        format!("{}/{}", self.host, self.slice.prefix_len())
    }
}

/// Guest addresses of one slice in use.
#[derive(Debug)]
pub struct SliceAddrs {
    slice: Ipv4Net,
    used: BTreeSet<u32>,
}

impl SliceAddrs {
    pub fn new(slice: Ipv4Net) -> SliceAddrs {
        SliceAddrs {
            slice,
            used: BTreeSet::new(),
        }
    }

    /// Offsets guests may use: from 2 (after the host's 1) up to the one
    /// before the broadcast address.
    fn range(&self) -> std::ops::RangeInclusive<u32> {
        let size = 1u32 << (32 - self.slice.prefix_len());
        2..=size - 2
    }

    /// How many guest addresses the slice has.
    pub fn capacity(&self) -> usize {
        self.range().count()
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// The lowest free guest address.
    pub fn take(&mut self) -> Result<Ipv4Addr, OverlayError> {
        let free = self.range().find(|o| !self.used.contains(o));
        let Some(offset) = free else {
            return Err(OverlayError::SliceFull {
                slice: self.slice.to_string(),
                capacity: self.capacity(),
            });
        };
        self.used.insert(offset);
        Ok(Ipv4Addr::from(u32::from(self.slice.network()) + offset))
    }

    /// Gives an address back; one of another slice or not taken is ignored.
    pub fn release(&mut self, addr: Ipv4Addr) {
        if self.slice.contains(&addr) {
            self.used
                .remove(&(u32::from(addr) - u32::from(self.slice.network())));
        }
    }

    /// The address's offset in the slice (names its veth and namespace).
    pub fn offset(&self, addr: Ipv4Addr) -> u32 {
        u32::from(addr) - u32::from(self.slice.network())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(cidr: &str, slice: &str, address: &str) -> OverlayLease {
        OverlayLease {
            cidr: cidr.into(),
            slice: slice.into(),
            address: address.into(),
        }
    }

    fn field(r: Result<Lease, OverlayError>) -> &'static str {
        match r {
            Err(OverlayError::Lease { field, .. }) => field,
            other => panic!("expected a lease error, got {other:?}"),
        }
    }

    #[test]
    fn good_lease_parses() {
        let l = Lease::parse(&lease("100.96.0.0/16", "100.96.3.0/24", "100.96.3.1/24")).unwrap();
        assert_eq!(l.host, Ipv4Addr::new(100, 96, 3, 1));
        assert_eq!(l.host_mask(), Ipv4Addr::new(0, 0, 0, 255));
        assert_eq!(l.host_cidr(), "100.96.3.1/24");
    }

    #[test]
    fn bad_leases_name_the_field() {
        assert_eq!(
            field(Lease::parse(&lease("x", "100.96.3.0/24", "100.96.3.1/24"))),
            "cidr"
        );
        assert_eq!(
            field(Lease::parse(&lease(
                "100.96.0.0/16",
                "100.97.3.0/24",
                "100.97.3.1/24"
            ))),
            "slice"
        );
        assert_eq!(
            field(Lease::parse(&lease(
                "100.96.0.0/16",
                "100.96.3.5/24",
                "100.96.3.1/24"
            ))),
            "slice"
        );
        assert_eq!(
            field(Lease::parse(&lease(
                "100.96.0.0/16",
                "100.96.3.0/31",
                "100.96.3.1/31"
            ))),
            "slice"
        );
        assert_eq!(
            field(Lease::parse(&lease(
                "100.96.0.0/16",
                "100.96.3.0/24",
                "100.96.3.1/16"
            ))),
            "address"
        );
        assert_eq!(
            field(Lease::parse(&lease(
                "100.96.0.0/16",
                "100.96.3.0/24",
                "100.96.3.9/24"
            ))),
            "address"
        );
    }

    #[test]
    fn guests_take_the_lowest_free_address_and_give_it_back() {
        let mut a = SliceAddrs::new("100.96.3.0/24".parse().unwrap());
        assert_eq!(a.capacity(), 253);
        let first = a.take().unwrap();
        let second = a.take().unwrap();
        assert_eq!(first, Ipv4Addr::new(100, 96, 3, 2));
        assert_eq!(second, Ipv4Addr::new(100, 96, 3, 3));
        a.release(first);
        assert_eq!(a.in_use(), 1);
        assert_eq!(a.take().unwrap(), first);
        assert_eq!(a.offset(second), 3);
    }

    #[test]
    fn a_full_slice_is_an_error() {
        // A /30: network, host, one guest, broadcast.
        let mut a = SliceAddrs::new("100.96.3.4/30".parse().unwrap());
        assert_eq!(a.take().unwrap(), Ipv4Addr::new(100, 96, 3, 6));
        assert!(matches!(
            a.take(),
            Err(OverlayError::SliceFull { capacity: 1, .. })
        ));
        a.release(Ipv4Addr::new(100, 96, 3, 6));
        a.take().unwrap();
    }
}
