//! Announcements on the real kernel: two hosts on one segment; the
//! neighbour's cache entry for the address points at a stale MAC until the
//! announcement (gratuitous ARP, unsolicited NA) replaces it with ours.

use std::net::IpAddr;
use tcpr_netlab::{Host, Lab};

const STALE_MAC: &str = "02:00:00:00:00:99";

fn mac_of_eth0(h: &Host) -> String {
    let out = h.ip(&["-br", "link", "show", "eth0"]).unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split_whitespace().nth(2).unwrap().to_string()
}

fn neighbour_mac(h: &Host, ip: &str) -> String {
    let out = h.ip(&["neigh", "show", ip, "dev", "eth0"]).unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = line.split_whitespace();
    words.find(|w| *w == "lladdr");
    words.next().unwrap_or("").to_string()
}

#[test]
fn announcements_replace_a_neighbours_stale_entry() {
    let mut lab = Lab::new("ann").unwrap();
    let a = lab.host("a", &["10.85.0.1/24", "fd85::1/64"]).unwrap();
    let b = lab.host("b", &["10.85.0.2/24", "fd85::2/64"]).unwrap();
    let ours = mac_of_eth0(&a);
    // Let b take a changed MAC from an ARP at any time (the default waits
    // `locktime`, 1 s, after an entry changed).
    b.ip(&[
        "ntable",
        "change",
        "name",
        "arp_cache",
        "dev",
        "eth0",
        "locktime",
        "0",
    ])
    .unwrap();
    for svc in ["10.85.0.100", "fd85::100"] {
        let plen = if svc.contains(':') { "128" } else { "32" };
        a.ip(&[
            "addr",
            "add",
            &format!("{svc}/{plen}"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
        b.ip(&[
            "neigh", "replace", svc, "lladdr", STALE_MAC, "dev", "eth0", "nud", "stale",
        ])
        .unwrap();
        assert_eq!(neighbour_mac(&b, svc), STALE_MAC);
        let ip: IpAddr = svc.parse().unwrap();
        // Announce until b has taken it: the frame crosses the bridge
        // asynchronously, and ARP ignores a change within the jiffy of the
        // last one.
        let mut seen = String::new();
        for _ in 0..200 {
            a.announce(ip).unwrap();
            seen = neighbour_mac(&b, svc);
            if seen == ours {
                break;
            }
        }
        assert_eq!(seen, ours, "b's entry for {svc} after the announcement");
    }
}
