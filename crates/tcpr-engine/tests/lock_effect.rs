//! The flow lock acts when the call returns, on the real kernel, each test
//! in a network namespace of its own thread, with both ends of a real
//! connection in a python3 peer: a lock drops the flow's packets both ways
//! from the moment it is acquired; the first packet sent after a release
//! arrives, with no retransmission; a relock right after a release drops
//! again; the lock outlives the socket and the process that took it and
//! expires by itself after its lease; a process that relocked exits and
//! the child that closes its netlink sockets ends too; nothing stays
//! behind in nftables.
mod common;
mod lock_peer;
use common::*;
use lock_peer::{End, PyPair};
use std::process::Command;
use std::time::Duration;
use tcpr_engine::{lock, Flow, FlowLock, Netns};

const LEASE: Duration = Duration::from_secs(60);

/// The whole nftables ruleset of the namespace.
fn ruleset() -> String {
    let out = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until the ruleset is `baseline` again: every element expired.
fn nothing_left(baseline: &str) {
    wait_until("the lock's elements expire", WAIT, || ruleset() == baseline);
}

#[test]
fn a_lock_drops_the_flow_both_ways_from_the_moment_acquire_returns() {
    in_private_netns(|| {
        lock::prepare().unwrap();
        let baseline = ruleset();
        for v6 in [false, true] {
            let mut p = PyPair::new(v6);
            p.passes_at_once("before");
            let l = FlowLock::acquire(&[p.flow], Netns::current(), LEASE).unwrap();
            assert!(lock::is_locked(&Netns::current(), &p.flow).unwrap());
            p.dropped_both_ways("held");
            l.release().unwrap();
            assert!(!lock::is_locked(&Netns::current(), &p.flow).unwrap());
            p.delivers_late("held");
            p.passes_at_once("after");
        }
        nothing_left(&baseline);
    });
}

#[test]
fn a_packet_sent_right_after_release_returns_arrives() {
    in_private_netns(|| {
        lock::prepare().unwrap();
        let baseline = ruleset();
        type Release = fn(FlowLock) -> Result<(), tcpr_engine::Error>;
        let releases: [(&str, Release); 3] = [
            ("release", FlowLock::release),
            ("release_many", |l| FlowLock::release_many(vec![l])),
            ("release_moved", |l| FlowLock::release_moved(vec![l])),
        ];
        for (name, release) in releases {
            for v6 in [false, true] {
                let mut p = PyPair::new(v6);
                let l = FlowLock::acquire(&[p.flow], Netns::current(), LEASE).unwrap();
                release(l).unwrap();
                // No wait and no retry: the very first transmission passes.
                p.passes_at_once(name);
            }
        }
        nothing_left(&baseline);
    });
}

#[test]
fn a_relock_right_after_release_drops_at_once() {
    in_private_netns(|| {
        lock::prepare().unwrap();
        let baseline = ruleset();
        let mut p = PyPair::new(false);
        for round in ["one", "two", "three"] {
            FlowLock::acquire(&[p.flow], Netns::current(), LEASE)
                .unwrap()
                .release()
                .unwrap();
            // Within the released flow's `unlocked` time: the lock must
            // remove that element, or it would let the packets through.
            let l = FlowLock::acquire(&[p.flow], Netns::current(), LEASE).unwrap();
            p.dropped_both_ways(round);
            l.release().unwrap();
            p.delivers_late(round);
        }
        p.passes_at_once("after");
        nothing_left(&baseline);
    });
}

/// Set in a re-run of this test binary: the child that takes a lock and
/// exits (its value: local, peer, lease in ms).
const CHILD_ENV: &str = "TCPR_TEST_LOCK_CHILD";

/// The flow a child re-run is given ("local peer ..."), and all the words.
fn child_flow(spec: &str) -> (Flow, Vec<&str>) {
    let w: Vec<&str> = spec.split_whitespace().collect();
    let flow = Flow {
        local: w[0].parse().unwrap(),
        peer: w[1].parse().unwrap(),
    };
    (flow, w)
}

#[test]
fn the_lock_outlives_the_socket_and_the_process_and_expires_after_its_lease() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        // The child: lock, leave the lock to its lease, exit.
        let (flow, w) = child_flow(&spec);
        let lease = Duration::from_millis(w[2].parse().unwrap());
        FlowLock::acquire(&[flow], Netns::current(), lease)
            .unwrap()
            .keep();
        std::process::exit(0);
    }
    in_private_netns(|| {
        lock::prepare().unwrap();
        let baseline = ruleset();
        let mut p = PyPair::new(false);
        let lease = Duration::from_secs(3);
        // The child inherits this thread's namespace.
        let st = Command::new(std::env::current_exe().unwrap())
            .args([
                "the_lock_outlives_the_socket_and_the_process_and_expires_after_its_lease",
                "--exact",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("{} {} {}", p.flow.local, p.flow.peer, lease.as_millis()),
            )
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "the locking child failed");
        // The process that took the lock is gone; now the socket goes too
        // (its FIN is dropped), and the peer's data meets no socket but the
        // lock: no RST comes back, the peer only retransmits.
        assert!(lock::is_locked(&Netns::current(), &p.flow).unwrap());
        p.close(End::Server);
        let sent = p.retrans(End::Client);
        p.send(End::Client, "late");
        wait_until("the peer retransmits into the lock", WAIT, || {
            p.retrans(End::Client) > sent
        });
        assert!(lock::is_locked(&Netns::current(), &p.flow).unwrap());
        // It ends by itself: the lease expires.
        wait_until("the lease expires", lease + WAIT, || {
            !lock::is_locked(&Netns::current(), &p.flow).unwrap()
        });
        nothing_left(&baseline);
    });
}

/// Set in a re-run of this test binary: the child that relocks a flow
/// right after releasing it and exits (its value: local, peer).
const RELOCK_CHILD_ENV: &str = "TCPR_TEST_RELOCK_CHILD";

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn a_process_that_relocked_exits_and_its_netlink_sockets_close_in_a_child_that_ends() {
    if let Ok(spec) = std::env::var(RELOCK_CHILD_ENV) {
        // The child: lock, release, relock at once (the relock destroys a
        // present `unlocked` element), keep it, hand the sockets over, exit.
        let (flow, _) = child_flow(&spec);
        // A few times: one relock within the release's `unlocked` time
        // is enough, even on a machine that stalls this process.
        for _ in 0..5 {
            FlowLock::acquire(&[flow], Netns::current(), LEASE)
                .unwrap()
                .release()
                .unwrap();
            FlowLock::acquire(&[flow], Netns::current(), LEASE)
                .unwrap()
                .keep();
        }
        let closer = lock::detach_sockets().expect("a child closes the sockets");
        println!("closer={closer}");
        std::process::exit(0);
    }
    in_private_netns(|| {
        lock::prepare().unwrap();
        let baseline = ruleset();
        let mut p = PyPair::new(false);
        // Its output is read to the end: the closer holds none of it.
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "a_process_that_relocked_exits_and_its_netlink_sockets_close_in_a_child_that_ends",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(
                RELOCK_CHILD_ENV,
                format!("{} {}", p.flow.local, p.flow.peer),
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "the relocking child failed");
        let closer: u32 = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("closer=")?.parse().ok())
            .expect("the child printed its closer's pid");
        // The relock is in force after the process is gone.
        p.dropped_both_ways("relocked");
        wait_until("the closer exits", Duration::from_secs(1), || {
            exited(closer)
        });
        lock::release_flows(&Netns::current(), &[p.flow]).unwrap();
        p.delivers_late("relocked");
        p.passes_at_once("after");
        nothing_left(&baseline);
    });
}

/// The rules and sets of the lock before the `unlocked` sets.
const OLD_LAYOUT: &str = "add table inet tcpr
add set inet tcpr flows4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }
add set inet tcpr flows6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; flags timeout; }
add chain inet tcpr pre { type filter hook prerouting priority -300; policy accept; }
add chain inet tcpr out { type filter hook output priority -300; policy accept; }
add rule inet tcpr pre ip saddr . tcp sport . ip daddr . tcp dport @flows4 drop
add rule inet tcpr pre ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 drop
add rule inet tcpr out ip daddr . tcp dport . ip saddr . tcp sport @flows4 drop
add rule inet tcpr out ip6 daddr . tcp dport . ip6 saddr . tcp sport @flows6 drop
";

#[test]
fn prepare_upgrades_a_table_of_the_older_layout() {
    in_private_netns(|| {
        let mut p = PyPair::new(false);
        // An older tcpr installed the table and holds a lock.
        let element = format!(
            "add element inet tcpr flows4 {{ {} . {} . {} . {} timeout 60s }}\n",
            p.flow.peer.ip(),
            p.flow.peer.port(),
            p.flow.local.ip(),
            p.flow.local.port()
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = nft.stdin.take().unwrap();
        stdin
            .write_all((OLD_LAYOUT.to_string() + &element).as_bytes())
            .unwrap();
        drop(stdin);
        assert!(nft.wait().unwrap().success());
        lock::prepare().unwrap();
        let rules = ruleset();
        let drops: Vec<&str> = rules.lines().filter(|l| l.contains(" drop")).collect();
        assert_eq!(drops.len(), 4, "{rules}");
        for rule in drops {
            assert!(rule.contains("!= @unlocked"), "an old rule is left: {rule}");
        }
        // The older process's lock holds across the upgrade, and releases.
        assert!(lock::is_locked(&Netns::current(), &p.flow).unwrap());
        p.dropped_both_ways("old");
        lock::release_flows(&Netns::current(), &[p.flow]).unwrap();
        p.delivers_late("old");
        p.passes_at_once("new");
    });
}
