//! The default interface: the one the default route leaves through, read from the
//! kernel's routing tables in /proc (IPv4 first, then IPv6).

use anyhow::{bail, Result};

/// Picks the lowest-metric IPv4 default route's interface from /proc/net/route text.
pub fn from_route_v4(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            // RTF_UP
            if flags & 1 == 0 {
                return None;
            }
            Some((f[6].parse::<u32>().unwrap_or(u32::MAX), f[0].to_string()))
        })
        .min()
        .map(|(_, n)| n)
}

/// Same for /proc/net/ipv6_route (::/0 routes, loopback excluded).
pub fn from_route_v6(table: &str) -> Option<String> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dst dst_len src src_len next_hop metric refcnt use flags iface
            if f.len() < 10 || f[0] != "00000000000000000000000000000000" || f[1] != "00" {
                return None;
            }
            if f[9] == "lo" {
                return None;
            }
            Some((
                u32::from_str_radix(f[5], 16).unwrap_or(u32::MAX),
                f[9].to_string(),
            ))
        })
        .min()
        .map(|(_, n)| n)
}

pub fn default_iface() -> Result<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    if let Some(i) = from_route_v4(&v4) {
        return Ok(i);
    }
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    if let Some(i) = from_route_v6(&v6) {
        return Ok(i);
    }
    bail!("no default route to pick an interface from; name one with --iface")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_default_route_lowest_metric() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                 eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                 eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(from_route_v4(t).as_deref(), Some("eth0"));
        assert_eq!(from_route_v4("Iface\n"), None);
    }

    #[test]
    fn v6_default_route() {
        let t = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(from_route_v6(t).as_deref(), Some("eth0"));
    }
}
