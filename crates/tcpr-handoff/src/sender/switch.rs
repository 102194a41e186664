//! Switching the flows' traffic to the agent's host, and undoing it.

use super::Driver;
use crate::machine::{ConnId, ServiceAddress};
use std::io;
use std::net::IpAddr;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use tcpr_engine::Flow;

/// A caller's own traffic switch, run in process: `switch` once every
/// connection of the batch is READY at the agent and before COMMIT, and
/// `unswitch` when the batch rolls back after it. Both get the flows as
/// the wire sees them (`local` is the address the peer connected to).
pub trait TrafficHook: Send + Sync + std::fmt::Debug {
    /// Sends the flows' packets to the agent's host from now on.
    fn switch(&self, flows: &[Flow]) -> Result<(), String>;
    /// [`TrafficHook::switch`] told, for each flow, where its peer's
    /// sequence numbers stand (what the frozen socket expected), when its
    /// dump read them: a datapath can then tell the peer's packets from
    /// forged ones from the first. By default, `switch`.
    fn switch_expecting(&self, flows: &[(Flow, Option<PeerSeq>)]) -> Result<(), String> {
        let flows: Vec<Flow> = flows.iter().map(|(f, _)| *f).collect();
        self.switch(&flows)
    }
    /// Undoes [`TrafficHook::switch`] (flows never switched are fine).
    fn unswitch(&self, flows: &[Flow]) -> Result<(), String>;
}

/// Where a frozen connection's peer's sequence numbers stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSeq {
    /// The sequence number the peer sends next.
    pub next: u32,
    /// The lowest acknowledgement number it may send: the oldest byte of
    /// ours it has not acknowledged.
    pub ack: u32,
}

/// How the flows' packets reach the agent's host once committed.
#[derive(Debug, Clone)]
pub enum Switch {
    /// Something else takes care of it (or the test does).
    Nothing,
    /// The connections' local address moves: removed here, added at the
    /// agent's host and announced there.
    MoveAddress,
    /// Shell commands: `switch` before COMMIT, `unswitch` on roll back.
    Commands {
        /// Run to send the flows to the agent.
        switch: String,
        /// Run to undo it.
        unswitch: String,
    },
    /// A hook of the caller's (a load balancer's steering datapath).
    Hook(Arc<dyn TrafficHook>),
}

/// Why a traffic switch (or its undoing) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// The command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: io::Error,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status})")]
    Command {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The caller's hook failed.
    #[error("traffic switch: {0}")]
    Hook(String),
    /// The service address is not assigned here.
    #[error("cannot find the service address {ip} on this host: {source}")]
    FindAddress {
        /// The address.
        ip: IpAddr,
        /// Why.
        source: Box<tcpr_host::addr::Error>,
    },
    /// Removing, putting back or announcing the address failed.
    #[error("cannot {what} {cidr} on {ifname}: {source}")]
    Address {
        /// "remove", "put back" or "announce".
        what: &'static str,
        /// The address.
        cidr: String,
        /// The interface.
        ifname: String,
        /// Why.
        source: Box<tcpr_host::addr::Error>,
    },
}

/// Runs `command` with `/bin/sh -c` and waits for it.
fn run_shell_command(command: &str) -> Result<(), SwitchError> {
    let status = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|source| SwitchError::Spawn {
            command: command.to_string(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(SwitchError::Command {
            command: command.to_string(),
            status,
        })
    }
}

impl Driver<'_> {
    /// Switches the flows; returns the service address it took off this
    /// host, if any, for the agent to take on COMMIT.
    pub(super) fn switch(&mut self, ids: &[ConnId]) -> Result<Option<ServiceAddress>, SwitchError> {
        match &self.opts.switch {
            Switch::Nothing => Ok(None),
            Switch::Commands { switch, .. } => run_shell_command(switch).map(|()| None),
            Switch::Hook(hook) => {
                let expecting: Vec<(Flow, Option<PeerSeq>)> = ids
                    .iter()
                    .filter_map(|id| self.conns.get(id))
                    .map(|c| (c.flow.wire(), c.peer_seq))
                    .collect();
                hook.switch_expecting(&expecting)
                    .map_err(SwitchError::Hook)?;
                self.hooked = expecting.into_iter().map(|(f, _)| f).collect();
                Ok(None)
            }
            Switch::MoveAddress => {
                // `migrate` checked that the batch has one local address.
                let Some(ip) = ids
                    .first()
                    .and_then(|id| self.conns.get(id))
                    .map(|c| c.flow.wire().local.ip())
                else {
                    return Ok(None);
                };
                let held = match self.found_ahead.as_mut().and_then(Option::take) {
                    Some(held) if held.ip == ip => held,
                    _ => tcpr_host::addr::find(ip).map_err(|source| SwitchError::FindAddress {
                        ip,
                        source: Box::new(source),
                    })?,
                };
                tcpr_host::addr::remove(&held).map_err(|source| SwitchError::Address {
                    what: "remove",
                    cidr: held.cidr(),
                    ifname: held.ifname.clone(),
                    source: Box::new(source),
                })?;
                let moved = ServiceAddress {
                    ip: held.ip,
                    prefix_len: held.prefix_len,
                };
                self.moved_address = Some(held);
                Ok(Some(moved))
            }
        }
    }

    /// Finds the service address an address move will remove, once per
    /// batch, while the sender first waits for the agent (its frames sent,
    /// the agent restoring) rather than after the last READY, within the
    /// connections' pause. Not found here, it is looked for again at the
    /// switch, which fails there if it still is not.
    pub(super) fn find_address_ahead(&mut self) {
        if self.found_ahead.is_some() || !matches!(self.opts.switch, Switch::MoveAddress) {
            return;
        }
        let ip = self.conns.values().next().map(|c| c.flow.wire().local.ip());
        self.found_ahead = Some(ip.and_then(|ip| tcpr_host::addr::find(ip).ok()));
    }

    pub(super) fn unswitch(&mut self) -> Result<(), SwitchError> {
        match &self.opts.switch {
            Switch::Nothing => Ok(()),
            Switch::Commands { unswitch, .. } => run_shell_command(unswitch),
            Switch::Hook(hook) => {
                let flows = std::mem::take(&mut self.hooked);
                hook.unswitch(&flows).map_err(SwitchError::Hook)
            }
            Switch::MoveAddress => {
                let Some(held) = self.moved_address.take() else {
                    return Ok(());
                };
                tcpr_host::addr::add(&held).map_err(|source| SwitchError::Address {
                    what: "put back",
                    cidr: held.cidr(),
                    ifname: held.ifname.clone(),
                    source: Box::new(source),
                })?;
                tcpr_host::announce(&held.ifname, held.ip).map_err(|e| SwitchError::Address {
                    what: "announce",
                    cidr: held.cidr(),
                    ifname: held.ifname.clone(),
                    source: Box::new(tcpr_host::addr::Error::Kernel {
                        what: "announce the address",
                        source: e,
                    }),
                })
            }
        }
    }
}
