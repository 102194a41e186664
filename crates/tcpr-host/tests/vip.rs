//! The VIPs of direct server return, shared by a host's agents, on the
//! real kernel in a private network namespace: the last agent to end
//! undoes (the VIP it or another agent added, the ARP settings raised),
//! the others leave them; a killed agent's VIP is taken over and undone
//! by the next agent's end.
mod common;
use common::*;
use std::net::IpAddr;
use std::process::Command;
use tcpr_host::vip;

fn on_lo(ip: &str) -> bool {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/"))
}

fn arp_ignore() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/arp_ignore")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_last_agent_out_undoes_the_vips_the_others_leave_them() {
    in_private_netns(|| {
        const V4: &str = "192.0.2.100";
        const V6: &str = "2001:db8::100";
        let vips: Vec<IpAddr> = [V4, V6].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(arp_ignore(), "0");
        let first = vip::prepare(&vips).unwrap();
        assert!(on_lo(V4) && on_lo(V6));
        assert_eq!(arp_ignore(), "1");
        // A second agent of the host, for another port of the VIPs.
        let second = vip::prepare(&vips).unwrap();
        drop(first);
        assert!(
            on_lo(V4) && on_lo(V6),
            "the first agent's end left the VIPs to the second"
        );
        assert_eq!(arp_ignore(), "1", "and the ARP settings");
        drop(second);
        assert!(!on_lo(V4) && !on_lo(V6), "the last one out removed them");
        assert_eq!(arp_ignore(), "0", "and put the ARP settings back");
        // And their records: only the directory's lock stays.
        let nl = tcpr_host::sock::netlink_socket(libc::NETLINK_ROUTE).unwrap();
        let cookie = tcpr_host::sock::netns_cookie(std::os::fd::AsFd::as_fd(&nl)).unwrap();
        let dir = format!("{}/netns-{cookie:x}", vip::STATE_DIR);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [".lock"], "{dir}");

        // A killed agent undoes nothing: the next one takes its VIPs over,
        // and its end undoes what the killed one did.
        vip::prepare(&vips).unwrap().abandon();
        assert!(on_lo(V4) && arp_ignore() == "1");
        let next = vip::prepare(&vips).unwrap();
        drop(next);
        assert!(!on_lo(V4) && !on_lo(V6));
        assert_eq!(arp_ignore(), "0");

        // A VIP that was on lo before any agent stays after the last.
        assert!(Command::new("ip")
            .args(["addr", "add", &format!("{V4}/32"), "dev", "lo"])
            .status()
            .unwrap()
            .success());
        drop(vip::prepare(&vips).unwrap());
        assert!(on_lo(V4), "not an agent's: left");
        assert!(!on_lo(V6));
    });
}
