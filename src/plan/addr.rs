//! Addressing rules of nixpkgs' NixOS test framework (nixos/lib/testing/network.nix
//! and nixos/lib/qemu-common.nix), so a machine gets the addresses a NixOS user expects.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const IPV4_PREFIX_LENGTH: u8 = 24;
pub const IPV6_PREFIX_LENGTH: u8 = 64;

/// The MAC of every machine's user-mode NIC (eth0). Not QEMU's default
/// 52:54:00:12:34:56, which is also machine 86's MAC on vlan 52: the guest
/// names its NICs by MAC, so the two must never meet. Machine number 0 is
/// never assigned, so this one never does.
pub const USER_NIC_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x00, 0x00]);
/// The guest's address on QEMU's user-mode network (slirp's fixed default).
pub const USER_NET_GUEST_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `52:54:00:12:<vlan>:<machine>`, as nixpkgs' qemuNicMac.
    pub fn for_vlan_nic(vlan: u8, machine: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0x00, 0x12, vlan, machine])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            if part.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `192.168.<vlan>.<machine>`, as nixpkgs' network.nix.
pub fn ipv4(vlan: u8, machine: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, vlan, machine)
}

/// `2001:db8:<vlan>::<machine>` with vlan and machine written in decimal, as
/// nixpkgs interpolates them: vlan 10 machine 12 is `2001:db8:10::12`, that is
/// the hextets 0x10 and 0x12, not 0xa and 0xc. Kept as nixpkgs' text (vlan 0
/// gives `2001:db8:0::1`, not the compressed `2001:db8::1`) so hosts files and
/// Nix-side values compare equal as strings.
pub fn ipv6(vlan: u8, machine: u8) -> String {
    format!("2001:db8:{vlan}::{machine}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn mac_is_two_lowercase_hex_digits_per_byte() {
        for (vlan, machine, want) in [
            (1, 1, "52:54:00:12:01:01"),
            (0, 9, "52:54:00:12:00:09"),
            (10, 15, "52:54:00:12:0a:0f"),
            (16, 254, "52:54:00:12:10:fe"),
            (255, 200, "52:54:00:12:ff:c8"),
        ] {
            assert_eq!(MacAddr::for_vlan_nic(vlan, machine).to_string(), want);
        }
    }

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: MacAddr = "52:54:00:12:0a:FE".parse().unwrap();
        assert_eq!(mac, MacAddr::for_vlan_nic(10, 254));
        for bad in ["", "52:54:00:12:0a", "52:54:00:12:0a:fe:01", "52:54:00:12:0a:f", "52:54:00:12:0a:zz"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn addresses_use_decimal_vlan_and_machine() {
        for (vlan, machine, v4, v6) in [
            (1, 1, "192.168.1.1", "2001:db8:1::1"),
            (0, 254, "192.168.0.254", "2001:db8:0::254"),
            (10, 12, "192.168.10.12", "2001:db8:10::12"),
            (255, 99, "192.168.255.99", "2001:db8:255::99"),
        ] {
            assert_eq!(ipv4(vlan, machine).to_string(), v4);
            assert_eq!(ipv6(vlan, machine), v6);
            assert!(v6.parse::<Ipv6Addr>().is_ok(), "{v6} is not an IPv6 address");
        }
    }
}
