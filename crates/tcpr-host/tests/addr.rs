//! Address moves over rtnetlink, on the real kernel, in a private network
//! namespace with a veth interface: what `addr` adds, `ip` sees, and what
//! `ip` assigned, `addr` finds.
mod common;
use common::*;
use std::net::IpAddr;
use std::process::Command;
use tcpr_host::addr::{self, Assigned};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn add_find_route_remove() {
    in_private_netns(|| {
        // (This kernel has no dummy interfaces; a veth pair will do.)
        ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ip(&["link", "set", "d0", "up"]);
        ip(&["link", "set", "d1", "up"]);
        let ifindex = addr::interface_index("d0").unwrap();
        for (a, plen, other) in [
            ("192.0.2.10", 24, "192.0.2.77"),
            ("2001:db8::10", 64, "2001:db8::77"),
        ] {
            let want = Assigned {
                ip: a.parse().unwrap(),
                prefix_len: plen,
                ifindex,
                ifname: "d0".into(),
            };
            assert!(matches!(addr::find(want.ip), Err(addr::Error::NotFound(_))));
            addr::add(&want).unwrap();
            // Already there: not an error.
            addr::add(&want).unwrap();
            let shown = ip(&["-o", "addr", "show", "dev", "d0"]);
            assert!(shown.contains(&want.cidr()), "{shown}");
            let line = shown.lines().find(|l| l.contains(&want.cidr())).unwrap();
            assert!(!line.contains("tentative"), "no DAD wait: {line}");
            assert_eq!(addr::find(want.ip).unwrap(), want);
            let other: IpAddr = other.parse().unwrap();
            assert_eq!(
                addr::route_interface(other).unwrap(),
                (ifindex, "d0".to_string())
            );
            addr::remove(&want).unwrap();
            assert!(!ip(&["-o", "addr", "show", "dev", "d0"]).contains(&want.cidr()));
            assert!(
                addr::remove(&want).is_err(),
                "removing an absent address fails"
            );
        }
        // What `ip` assigned is found with its prefix and interface.
        ip(&["addr", "add", "198.51.100.5/28", "dev", "d0"]);
        let found = addr::find("198.51.100.5".parse().unwrap()).unwrap();
        assert_eq!((found.prefix_len, found.ifname.as_str()), (28, "d0"));
        assert!(addr::interface_index("nosuch0").is_err());
        assert!(addr::route_interface("203.0.113.1".parse().unwrap()).is_err());
    });
}
