//! `tcpr balance` in network namespaces: a client, the front host, two
//! backends; curl for HTTP by Host and HTTPS by SNI.

#[path = "balance_bed/mod.rs"]
mod balance_bed;
mod common;
use balance_bed::*;
use tcpr_netlab::balance::Family;

/// Requests for each host land on its backend, over HTTP and HTTPS, on
/// both VIPs; `who` answers "bN PATH CLIENT-IP".
fn assert_routes(bed: &Bed) {
    for family in [Family::V4, Family::V6] {
        for https in [false, true] {
            for (i, host) in HOSTS.iter().enumerate() {
                let body = bed.get(family, https, host, "/who");
                assert!(
                    body.starts_with(&format!("b{i} /who ")),
                    "{host} over {} via {family:?}: {body:?}",
                    if https { "https" } else { "http" }
                );
            }
        }
    }
}

#[test]
fn routes_by_host_and_sni_when_proxying() {
    let mut bed = Bed::new("bp", 140);
    bed.start_servers();
    let config = bed.config_text(false);
    bed.start_balancer(&config, &["--no-steering"]);
    assert_routes(&bed);
    // 2 families x 2 protocols x 2 hosts, all proxied.
    assert_eq!(bed.metric("tcpr_balance_proxied_total"), 8.0);
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 0.0);
}

#[test]
fn hands_off_by_host_and_sni() {
    let mut bed = Bed::new("bh", 141);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    bed.start_balancer(&config, &[]);
    assert_routes(&bed);
    assert_eq!(
        bed.metric("tcpr_balance_handoffs_total"),
        8.0,
        "{:?}",
        bed.metrics()
            .iter()
            .filter(|s| s.name.contains("failures") || s.name.contains("fallbacks"))
            .collect::<Vec<_>>()
    );
    assert_eq!(bed.metric("tcpr_balance_fallbacks_total"), 0.0);
    assert_eq!(bed.metric("tcpr_balance_proxied_total"), 0.0);
}
