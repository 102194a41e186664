//! The balancer's test bed: a client, a front host running `tcpr balance`,
//! two backends each running HTTP and HTTPS servers (balance_server.py)
//! and, when asked, `tcpr agent`s that take handed-off connections and
//! forward them to those servers.
#![allow(dead_code)]
#![allow(unreachable_pub)]

use super::common::*;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;
use tcpr_netlab::balance::{BalanceLab, Family};

/// The VIP's ports.
pub const HTTP_PORT: u16 = 80;
pub const HTTPS_PORT: u16 = 443;
/// The backends' servers.
pub const SERVER_HTTP_PORT: u16 = 8080;
pub const SERVER_HTTPS_PORT: u16 = 8443;
/// The agents: one per delivery target.
pub const AGENT_HTTP_PORT: u16 = 7700;
pub const AGENT_HTTPS_PORT: u16 = 7701;
/// The balancer's metrics, inside the front host.
pub const METRICS: &str = "127.0.0.1:9100";
/// The host names routed to backend 0 and 1.
pub const HOSTS: [&str; 2] = ["a.example", "b.example"];
/// How long a process may take to say it is ready.
pub const START: Duration = Duration::from_secs(60);

pub struct Bed {
    pub lab: BalanceLab,
    pub dir: PathBuf,
    pub psk: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub servers: Vec<Proc>,
    /// Per backend: its HTTP agent and its HTTPS agent.
    pub agents: Vec<Vec<Proc>>,
    pub balancer: Option<Proc>,
    /// What the balancer printed before `tcpr balance ready`.
    pub balancer_said: Vec<String>,
    pub config: PathBuf,
}

/// `addr` as an `ip:port` string (brackets for IPv6).
pub fn sock(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

impl Bed {
    pub fn new(tag: &str, net: u8) -> Bed {
        let dir = tmpdir(tag);
        let psk = dir.join("psk");
        std::fs::write(&psk, "the balancer tests' shared secret\n").unwrap();
        let ck = rcgen::generate_simple_self_signed(HOSTS.map(String::from).to_vec()).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let lab = BalanceLab::new(tag, net, 2).unwrap();
        let config = dir.join("balance.toml");
        Bed {
            lab,
            dir,
            psk,
            cert,
            key,
            servers: vec![],
            agents: vec![],
            balancer: None,
            balancer_said: vec![],
            config,
        }
    }

    /// HTTP and HTTPS servers on every backend, named b0, b1.
    pub fn start_servers(&mut self) {
        for (i, h) in self.lab.backends.iter().enumerate() {
            let name = format!("b{i}");
            let mut http = h.cmd("python3");
            http.args([&py("balance_server.py"), "--name", &name])
                .args(["--port", &SERVER_HTTP_PORT.to_string()]);
            let mut https = h.cmd("python3");
            https
                .args([&py("balance_server.py"), "--name", &name])
                .args(["--port", &SERVER_HTTPS_PORT.to_string()])
                .args(["--cert", self.cert.to_str().unwrap()])
                .args(["--key", self.key.to_str().unwrap()]);
            for (cmd, what) in [(http, "http server"), (https, "https server")] {
                let mut p = Proc::spawn(cmd, what);
                p.expect("ready", START);
                self.servers.push(p);
            }
        }
    }

    /// On every backend, an agent per server and address family: it owns
    /// the VIPs (on its loopback) and forwards each connection to its
    /// local server.
    pub fn start_agents(&mut self) {
        let mut all = vec![];
        for i in 0..self.lab.backends.len() {
            let mut agents = vec![];
            for family in [Family::V4, Family::V6] {
                for (agent, server, vip_port) in [
                    (AGENT_HTTP_PORT, SERVER_HTTP_PORT, HTTP_PORT),
                    (AGENT_HTTPS_PORT, SERVER_HTTPS_PORT, HTTPS_PORT),
                ] {
                    let listen = self.lab.backend_sock(family, i, agent);
                    agents.push(self.agent(i, listen, server, vip_port));
                }
            }
            all.push(agents);
        }
        self.agents = all;
    }

    pub fn agent(&self, i: usize, listen: SocketAddr, server: u16, vip_port: u16) -> Proc {
        // A journal each, so that an agent killed mid-batch leaves its
        // stand-in to answer the balancer (tests/balance_journal.rs).
        let journal = self.dir.join(format!(
            "journal-b{i}-{}-{}",
            listen.port(),
            u8::from(listen.is_ipv4())
        ));
        let cmd = self.agent_cmd(i, listen, server, vip_port, Some(&journal));
        let mut p = Proc::spawn(cmd, &format!("agent b{i} {listen}"));
        p.expect("tcpr agent listening", START);
        p
    }

    /// The command of backend `i`'s agent listening on `listen`, forwarding
    /// to its server on port `server`, allowed the VIPs' `vip_port`; with a
    /// journal in `journal`, or none.
    pub fn agent_cmd(
        &self,
        i: usize,
        listen: SocketAddr,
        server: u16,
        vip_port: u16,
        journal: Option<&std::path::Path>,
    ) -> Command {
        let h = &self.lab.backends[i];
        let mut cmd = h.cmd(tcpr_bin());
        cmd.args(["agent", "--listen", &listen.to_string()])
            .args(["--psk-file", self.psk.to_str().unwrap()])
            .args(["--forward", &format!("127.0.0.1:{server}")]);
        match journal {
            Some(dir) => cmd.args(["--journal", dir.to_str().unwrap()]),
            None => cmd.arg("--no-journal"),
        };
        for f in [Family::V4, Family::V6] {
            cmd.args(["--allow", &sock(self.lab.vip(f), vip_port)]);
            // The agents of one host share the VIPs: the second finds them
            // there and leaves them to the first.
            cmd.args(["--vip", &self.lab.vip(f).to_string()]);
        }
        cmd
    }

    /// The config: host a.example to backend 0, b.example to backend 1,
    /// over HTTP (Host) and TLS (SNI), on both VIPs. With `agents`, each
    /// member has its agent and its server; without, its server only. A
    /// member's agent address is also the next hop its steered flows are
    /// forwarded to, so the IPv6 listeners have pools of their own whose
    /// agents are named by their IPv6 addresses.
    pub fn config_text(&self, agents: bool) -> String {
        let l = &self.lab;
        let mut t = String::new();
        if agents {
            t += &format!("[agents]\npsk_file = {:?}\n\n", self.psk.to_str().unwrap());
        }
        t += &format!("[metrics]\nlisten = {METRICS:?}\n\n");
        for (family, fam) in [(Family::V4, ""), (Family::V6, "-v6")] {
            for (name, proto, port, tls) in [
                ("web", "http", HTTP_PORT, ""),
                ("tls", "tls", HTTPS_PORT, "-tls"),
            ] {
                t += &format!(
                    "[[listener]]\nname = \"{name}{fam}\"\nbind = [{:?}]\nprotocol = {proto:?}\nhead_timeout_ms = 2000\n\n",
                    sock(l.vip(family), port)
                );
                for (i, host) in HOSTS.iter().enumerate() {
                    t += &format!(
                        "[[listener.route]]\nhost = {host:?}\npool = \"b{i}{tls}{fam}\"\n\n"
                    );
                }
            }
            for i in 0..l.backends.len() {
                for (tls, agent, server) in [
                    ("", AGENT_HTTP_PORT, SERVER_HTTP_PORT),
                    ("-tls", AGENT_HTTPS_PORT, SERVER_HTTPS_PORT),
                ] {
                    let ip = l.backend_addr(family, i);
                    let agent = if agents {
                        format!("agent = {:?}, ", sock(ip, agent))
                    } else {
                        String::new()
                    };
                    t += &format!(
                        "[[pool]]\nname = \"b{i}{tls}{fam}\"\nmembers = [ {{ {agent}server = {:?} }} ]\n\n",
                        sock(ip, server)
                    );
                }
            }
        }
        t
    }

    /// Writes the config and starts `tcpr balance` on the front host.
    pub fn start_balancer(&mut self, config: &str, extra: &[&str]) {
        self.start_balancer_under(&[], config, extra);
    }

    /// [`Bed::start_balancer`] run by `wrapper` (a command and its
    /// arguments, such as `setpriv ...`; none when empty); the line it
    /// printed about its steering datapath, if it steers.
    pub fn start_balancer_under(
        &mut self,
        wrapper: &[&str],
        config: &str,
        extra: &[&str],
    ) -> Option<String> {
        std::fs::write(&self.config, config).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.lab.front.cmd(program);
                c.args(args).arg(tcpr_bin());
                c
            }
            None => self.lab.front.cmd(tcpr_bin()),
        };
        cmd.args(["balance", "--config", self.config.to_str().unwrap()])
            .arg("--steer-pin-dir")
            .arg(self.lab.pin_dir())
            .args(extra);
        let mut p = Proc::spawn(cmd, "balancer");
        let mut said = vec![];
        p.expect_after("tcpr balance ready", START, &mut said);
        let steering = said
            .iter()
            .find(|l| l.starts_with("tcpr balance steering: "))
            .cloned();
        assert_eq!(
            steering.is_some(),
            !extra.contains(&"--no-steering"),
            "{said:?}"
        );
        self.balancer = Some(p);
        self.balancer_said = said;
        steering
    }

    /// Sends `sig` (`-TERM`, `-HUP`, ...) to the balancer.
    pub fn signal(&self, sig: &str) {
        let pid = self.balancer.as_ref().unwrap().pid();
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// curl on the client host; its output.
    pub fn curl(&self, args: &[&str]) -> Output {
        let mut c = self.lab.client.cmd("curl");
        c.args(["-sS", "--fail", "--max-time", "60"]).args(args);
        c.output().unwrap()
    }

    /// GET `path` from `host` through the VIP of `family` (HTTP by Host or
    /// HTTPS by SNI); the body, asserting success.
    pub fn get(&self, family: Family, https: bool, host: &str, path: &str) -> String {
        let vip = self.lab.vip(family);
        let (scheme, port) = if https {
            ("https", HTTPS_PORT)
        } else {
            ("http", HTTP_PORT)
        };
        let resolve = match vip {
            IpAddr::V4(v) => format!("{host}:{port}:{v}"),
            IpAddr::V6(v) => format!("{host}:{port}:[{v}]"),
        };
        let out = self.curl(&[
            "-k",
            "--resolve",
            &resolve,
            &format!("{scheme}://{host}:{port}{path}"),
        ]);
        assert!(
            out.status.success(),
            "curl {scheme}://{host}{path} via {vip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `tcpr balance status` on the front host, as samples by name+labels.
    pub fn metrics(&self) -> Vec<tcpr_balance::Sample> {
        let out = self
            .lab
            .front
            .cmd("curl")
            .args(["-sS", &format!("http://{METRICS}/metrics")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tcpr_balance::parse_metrics(&String::from_utf8_lossy(&out.stdout))
    }

    /// The sum of metric `name`'s samples.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    pub fn cmd(&self, host: &tcpr_netlab::Host, program: &str) -> Command {
        host.cmd(program)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut b) = self.balancer.take() {
            b.kill();
        }
        self.agents.clear();
        self.servers.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
