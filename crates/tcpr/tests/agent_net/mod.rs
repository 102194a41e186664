//! Three hosts for the agent tests: a client `c`, the service host `a`
//! (which holds the service address) and the agent's host `b`; a shared
//! key, a journal directory and a fault directory per test.
#![allow(dead_code)]

use crate::common::*;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tcpr_netlab::{Host, Lab};

pub(crate) struct Net {
    pub(crate) _lab: Lab,
    pub(crate) c: Host,
    pub(crate) a: Host,
    pub(crate) b: Host,
    pub(crate) n: u8,
    pub(crate) key: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) journal: PathBuf,
}

impl Net {
    pub(crate) fn new(tag: &str, n: u8) -> Net {
        let dir = tmpdir(tag);
        let key = dir.join("psk");
        std::fs::write(&key, "a shared secret for the agent tests\n").unwrap();
        let mut lab = Lab::new(tag).unwrap();
        let addr = |h: u8| format!("10.{n}.0.{h}/24");
        let c = lab.host("c", &[&addr(1)]).unwrap();
        let a = lab.host("a", &[&addr(2), &addr(100)]).unwrap();
        let b = lab.host("b", &[&addr(3)]).unwrap();
        Net {
            _lab: lab,
            c,
            a,
            b,
            n,
            key,
            journal: dir.join("journal"),
            dir,
        }
    }
    pub(crate) fn svc(&self) -> String {
        format!("10.{}.0.100", self.n)
    }
    pub(crate) fn svc_port(&self, port: u16) -> String {
        format!("{}:{port}", self.svc())
    }
    pub(crate) fn agent_addr(&self) -> String {
        format!("10.{}.0.3:7070", self.n)
    }
    /// The agent's command line on b (listen, key, journal), `extra` after.
    pub(crate) fn agent_cmd(&self, extra: &[&str]) -> Command {
        let mut cmd = self.b.cmd(tcpr_bin());
        cmd.args([
            "agent",
            "--listen",
            &self.agent_addr(),
            "--psk-file",
            self.key.to_str().unwrap(),
            "--journal",
            self.journal.to_str().unwrap(),
        ])
        .args(extra)
        .env("TCPR_FAULT_DIR", &self.dir);
        cmd
    }
    /// Starts the agent and waits until it listens.
    pub(crate) fn agent(&self, extra: &[&str], fault: Option<&str>) -> Proc {
        let mut cmd = self.agent_cmd(extra);
        if let Some(point) = fault {
            cmd.env("TCPR_FAULT_STOP_AT", point);
        }
        let mut p = Proc::spawn(cmd, "agent");
        p.expect("tcpr agent listening", Duration::from_secs(10));
        p
    }
    /// echo.py on a, a streaming peer on c, queues flushed into the socket.
    pub(crate) fn stream(&self) -> (Proc, Proc) {
        let mut echo = echo_server(&self.a, &self.svc(), 8080, &[]);
        let peer = stream_peer(&self.c, &self.svc(), 8080, &["--rate", "1000000"]);
        echo.expect("ready", Duration::from_secs(10));
        echo.send("flush");
        echo.expect("paused", Duration::from_secs(10));
        (echo, peer)
    }
    /// `tcpr migrate --move-address` of `pid`'s connections to the agent.
    pub(crate) fn migrate_cmd(&self, pid: i32, extra: &[&str]) -> Command {
        let mut cmd = self.a.cmd(tcpr_bin());
        cmd.args([
            "migrate",
            "--to",
            &self.agent_addr(),
            "--psk-file",
            self.key.to_str().unwrap(),
            "--pid",
            &pid.to_string(),
            "--move-address",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }
    pub(crate) fn migrate(&self, pid: i32, extra: &[&str]) -> Output {
        self.migrate_cmd(pid, extra).output().unwrap()
    }
    pub(crate) fn has_svc(&self, h: &Host) -> bool {
        let out = h.ip(&["-o", "addr", "show"]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}/24", self.svc()))
    }
    /// Waits until the agent holds at its fault point (while `migrate`
    /// runs: if it ends first, says what it printed).
    pub(crate) fn wait_reached(&self, point: &str, migrate: &mut std::process::Child) {
        let f = self.dir.join(format!("reached-{point}"));
        for _ in 0..4000 {
            if f.exists() {
                return;
            }
            if let Ok(Some(st)) = migrate.try_wait() {
                let mut out = String::new();
                for pipe in [
                    migrate
                        .stdout
                        .take()
                        .map(|p| Box::new(p) as Box<dyn std::io::Read>),
                    migrate
                        .stderr
                        .take()
                        .map(|p| Box::new(p) as Box<dyn std::io::Read>),
                ]
                .into_iter()
                .flatten()
                {
                    let mut pipe = pipe;
                    let _ = pipe.read_to_string(&mut out);
                }
                panic!("migrate ended ({st}) before the agent reached {point}: {out}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the agent never reached its fault point {point}");
    }
    /// Lets the agent go on from its fault point.
    pub(crate) fn release(&self, point: &str) {
        std::fs::write(self.dir.join(format!("release-{point}")), b"").unwrap();
    }
    /// Sockets of host `h` whose local address is the service's port 8080,
    /// as `ss` lists them (state and queues).
    pub(crate) fn service_sockets(&self, h: &Host) -> Vec<String> {
        let out = h
            .cmd("ss")
            .args(["-Htan", "( sport = :8080 )"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&self.svc_port(8080)) && !l.starts_with("LISTEN"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tcpr migrate` moved nothing and said why: exit 2, one connection
/// rolled back, `why` on stderr.
pub(crate) fn assert_rolled_back(out: &Output, why: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{} {err}", last_line(out));
    assert!(
        last_line(out).starts_with("moved 0, rolled back 1, unknown 0"),
        "{} {err}",
        last_line(out)
    );
    assert!(err.contains(why), "stderr does not say {why:?}: {err}");
}

pub(crate) fn assert_moved(out: &Output) {
    assert!(out.status.success(), "{} {}", last_line(out), stderr(out));
    assert!(
        last_line(out).starts_with("moved 1, rolled back 0, unknown 0"),
        "{} {}",
        last_line(out),
        stderr(out)
    );
}

/// The echo command an agent runs per delivered connection.
pub(crate) fn echo_for_agent() -> String {
    format!("python3 {} --no-control", py("echo.py"))
}
