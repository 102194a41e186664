//! `tcpr ls`: the TCP connections of this host (or of one process), with
//! whether each is frozen, locked and dumpable.

use anyhow::Result;
use std::io::Write;
use tcpr_engine::diag::Fact;

/// How `ls` shows a fact: yes, no, or `?` when unknown.
fn fact_cell(f: &Fact) -> &'static str {
    match f {
        Fact::Yes => "yes",
        Fact::No => "no",
        Fact::Unknown(_) => "?",
    }
}

pub(crate) fn ls(pid: Option<i32>, json: bool) -> Result<i32> {
    let entries = tcpr_engine::diag::list(pid)?;
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(
            out,
            "{:<44} {:<44} {:<12} {:>8} {:>8}  {:<18} {:<6} {:<6} DUMPABLE",
            "LOCAL", "PEER", "STATE", "RECV-Q", "SEND-Q", "OWNER(PID/FD)", "FROZEN", "LOCKED"
        )
        .map_err(crate::stdout_closed)?;
    }
    for e in entries {
        let owners = e
            .owners
            .iter()
            .map(|o| format!("{}/{}", o.pid, o.fd))
            .collect::<Vec<_>>()
            .join(",");
        let dumpable = e.dumpable();
        if json {
            let unknown = |f: &Fact| match f {
                Fact::Unknown(why) => Some(why.clone()),
                _ => None,
            };
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "local": e.local.to_string(), "peer": e.peer.to_string(), "state": e.state_name(),
                    "recv_queue": e.recv_queue, "send_queue": e.send_queue,
                    "owners": e.owners.iter().map(|o| serde_json::json!({"pid": o.pid, "fd": o.fd})).collect::<Vec<_>>(),
                    "frozen": e.frozen.known(), "frozen_unknown": unknown(&e.frozen),
                    "locked": e.locked.known(), "locked_unknown": unknown(&e.locked),
                    "dumpable": dumpable.is_ok(), "not_dumpable_because": dumpable.err(),
                })
            ).map_err(crate::stdout_closed)?;
        } else {
            writeln!(
                out,
                "{:<44} {:<44} {:<12} {:>8} {:>8}  {:<18} {:<6} {:<6} {}",
                e.local.to_string(),
                e.peer.to_string(),
                e.state_name(),
                e.recv_queue,
                e.send_queue,
                match (owners.is_empty(), e.hidden_processes) {
                    (false, _) => owners,
                    // Held, perhaps, by a process we cannot see.
                    (true, hidden) if hidden > 0 => "?".into(),
                    (true, _) => "-".into(),
                },
                fact_cell(&e.frozen),
                fact_cell(&e.locked),
                match dumpable {
                    Ok(()) => "yes".to_string(),
                    Err(why) => format!("no: {why}"),
                }
            )
            .map_err(crate::stdout_closed)?;
        }
    }
    Ok(0)
}
