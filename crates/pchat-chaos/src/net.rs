//! The lab's network: one network namespace per host, each with one veth into a bridge that
//! lives in a switch namespace of its own, and nftables rules inside the hosts' namespaces
//! for partitions and loss.
//!
//! Nothing of it touches the machine's own namespace: every address is on the bridge, which
//! only the lab's namespaces reach, so the addresses can be the same in every lab (each lab
//! has its own switch) and a crashed run leaves nothing routed. Namespace names carry the
//! lab's id; [`Net::drop`] deletes them (and so every veth and rule).
//!
//! A cut is an nftables `drop` (a black hole, as a dead switch port or a firewall gives),
//! never a `reject`: TCP must find out by its own timeouts, which is the gray failure the
//! suite is after. One-way loss drops a share of one direction's packets with
//! `numgen random mod 100 < N`. The kernel here has no `sch_netem`: packet delay, jitter and
//! loss come from [`crate::netem`] (a TUN device in the host's namespace), and the older
//! byte-level delay from a redirection (`dnat`) through the harness's [`crate::proxy`].

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// The lab's subnet: 198.18.0.0/15 is set aside for network tests (RFC 2544) and is never
/// routed here; the lab uses its first /24 inside its own namespaces only.
pub const SUBNET: &str = "198.18.0.0/24";

/// One host: its namespace and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The lab's name for it (`a_db`, `a1`, `etcd2`, `client`).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
}

/// A rule in force: traffic between two hosts dropped, in one or both directions, wholly or
/// in part, optionally only to one TCP port of `to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cut {
    /// Packets from this host…
    pub from: Ipv4Addr,
    /// …to this host…
    pub to: Ipv4Addr,
    /// …are dropped with this probability (percent, 1..=100)…
    pub percent: u8,
    /// …if they go to (or come back from) this TCP port of `to`; `None`: all traffic.
    pub port: Option<u16>,
}

/// A redirection in force: `from`'s new connections to `to:port` go to `via` instead (the
/// delaying proxy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Redirect {
    /// The connecting host.
    pub from: Ipv4Addr,
    /// The address it dials…
    pub to: Ipv4Addr,
    /// …on this port…
    pub port: u16,
    /// …reaches this instead.
    pub via: std::net::SocketAddrV4,
}

/// The lab's namespaces and the rules in force.
pub struct Net {
    id: String,
    switch: String,
    hosts: Vec<Host>,
    cuts: BTreeSet<Cut>,
    redirects: BTreeSet<Redirect>,
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (apt-get install -y nftables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} refused:\n{script}\n{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// Creates the switch and one namespace per `(name, last octet)`, all on [`SUBNET`].
    /// `id` keeps labs apart (namespace names are global).
    pub fn create(id: &str, hosts: &[(&str, u8)]) -> anyhow::Result<Net> {
        let switch = format!("pcc{id}-sw");
        let mut net = Net {
            id: id.to_owned(),
            switch: switch.clone(),
            hosts: Vec::new(),
            cuts: BTreeSet::new(),
            redirects: BTreeSet::new(),
        };
        run(&["ip", "netns", "add", &switch])?;
        run(&["ip", "-n", &switch, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &switch, "link", "set", "br0", "up"])?;
        for (i, (name, octet)) in hosts.iter().enumerate() {
            let ns = format!("pcc{id}-{name}");
            let addr = Ipv4Addr::new(198, 18, 0, *octet);
            run(&["ip", "netns", "add", &ns])?;
            // Listed before its links exist, so a failure half-way still removes it.
            net.hosts.push(Host {
                name: (*name).to_owned(),
                ns: ns.clone(),
                addr,
            });
            let port = format!("p{i}");
            run(&[
                "ip", "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            run(&["ip", "-n", &switch, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &switch, "link", "set", &port, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            // The rules' table exists from the start, empty: a cut is then one atomic reload.
            nft(&ns, &ruleset(&[], &[]))?;
        }
        Ok(net)
    }

    /// The lab id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every host.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// A host by name (panics on an unknown one: a bug in the lab's tables).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the lab"))
    }

    /// The host with this address.
    pub fn host_at(&self, addr: Ipv4Addr) -> Option<&Host> {
        self.hosts.iter().find(|h| h.addr == addr)
    }

    /// Puts `cut` in force (and keeps the others).
    pub fn add(&mut self, cut: Cut) -> anyhow::Result<()> {
        self.cuts.insert(cut);
        self.apply()
    }

    /// Lifts `cut`.
    pub fn remove(&mut self, cut: &Cut) -> anyhow::Result<()> {
        self.cuts.remove(cut);
        self.apply()
    }

    /// Puts `r` in force and aborts `r.from`'s established connections to `r.to:r.port`
    /// (`ss -K`), so they reconnect through the redirection.
    pub fn redirect(&mut self, r: Redirect) -> anyhow::Result<()> {
        self.redirects.insert(r.clone());
        self.apply()?;
        self.abort_connections(r.from, r.to, r.port)
    }

    /// Lifts `r`, and aborts the connections that went through it.
    pub fn unredirect(&mut self, r: &Redirect) -> anyhow::Result<()> {
        self.redirects.remove(r);
        self.apply()?;
        self.abort_connections(r.from, *r.via.ip(), r.via.port())
    }

    fn abort_connections(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> anyhow::Result<()> {
        let Some(h) = self.host_at(from) else {
            return Ok(());
        };
        run(&[
            "ip",
            "netns",
            "exec",
            &h.ns,
            "ss",
            "-K",
            "dst",
            &to.to_string(),
            "dport",
            "=",
            &port.to_string(),
        ])
        .map(drop)
    }

    /// Lifts every cut and redirection.
    pub fn heal_all(&mut self) -> anyhow::Result<()> {
        self.cuts.clear();
        let redirects = std::mem::take(&mut self.redirects);
        self.apply()?;
        for r in redirects {
            let _ = self.abort_connections(r.from, *r.via.ip(), r.via.port());
        }
        Ok(())
    }

    /// The cuts in force.
    pub fn cuts(&self) -> impl Iterator<Item = &Cut> {
        self.cuts.iter()
    }

    /// Reloads every host's table from the cuts in force. A cut `from → to` is enforced in
    /// `to`'s input (and, for a port cut, in `to`'s output of the replies), so each host's
    /// table says what reaches it.
    fn apply(&self) -> anyhow::Result<()> {
        for h in &self.hosts {
            let mine: Vec<&Cut> = self
                .cuts
                .iter()
                .filter(|c| c.to == h.addr || (c.port.is_some() && c.from == h.addr))
                .collect();
            let redirects: Vec<String> = self
                .redirects
                .iter()
                .filter(|r| r.from == h.addr)
                .map(|r| {
                    format!(
                        "ip daddr {} tcp dport {} dnat ip to {}",
                        r.to, r.port, r.via
                    )
                })
                .collect();
            nft(&h.ns, &ruleset_for(h.addr, &mine, &redirects))?;
        }
        Ok(())
    }
}

fn ruleset(rules: &[String], redirects: &[String]) -> String {
    let mut s = String::from(
        "table inet chaos\ndelete table inet chaos\ntable inet chaos {\n\
         \tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n",
    );
    for r in rules.iter().filter(|r| r.starts_with("in ")) {
        s.push_str(&format!("\t\t{}\n", &r[3..]));
    }
    s.push_str("\t}\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n");
    for r in rules.iter().filter(|r| r.starts_with("out ")) {
        s.push_str(&format!("\t\t{}\n", &r[4..]));
    }
    s.push_str("\t}\n\tchain delayed {\n\t\ttype nat hook output priority -100; policy accept;\n");
    for r in redirects {
        s.push_str(&format!("\t\t{r}\n"));
    }
    s.push_str("\t}\n}\n");
    s
}

/// The rules host `me` enforces for `cuts` (each cut involves `me`).
fn ruleset_for(me: Ipv4Addr, cuts: &[&Cut], redirects: &[String]) -> String {
    let mut rules = Vec::new();
    for c in cuts {
        let odds = if c.percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {} ", c.percent)
        };
        match c.port {
            None if c.to == me => {
                rules.push(format!("in ip saddr {} {odds}drop", c.from));
            }
            None => {}
            // A port cut drops both the requests to the port and its replies.
            Some(p) if c.to == me => {
                rules.push(format!("in ip saddr {} tcp dport {p} {odds}drop", c.from));
                rules.push(format!("out ip daddr {} tcp sport {p} {odds}drop", c.from));
            }
            Some(_) => {}
        }
    }
    ruleset(&rules, redirects)
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end, and so the pair; processes still in it
        // keep it alive until they exit, which the lab makes sure of before.
        for h in &self.hosts {
            let _ = run(&["ip", "netns", "del", &h.ns]);
        }
        let _ = run(&["ip", "netns", "del", &self.switch]);
    }
}

/// Removes the namespaces of labs that died without cleaning up (names `pcc*-*` whose lab
/// id is not running any more is not knowable here, so only those of `id`).
pub fn remove_leftovers(id: &str) {
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("pcc{id}-")) {
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_enforces_what_reaches_it() {
        let me = Ipv4Addr::new(198, 18, 0, 21);
        let other = Ipv4Addr::new(198, 18, 0, 11);
        let all = Cut {
            from: other,
            to: me,
            percent: 100,
            port: None,
        };
        let half_api = Cut {
            from: other,
            to: me,
            percent: 50,
            port: Some(7070),
        };
        let text = ruleset_for(
            me,
            &[&all, &half_api],
            &["ip daddr 198.18.0.31 tcp dport 5432 dnat ip to 198.18.0.2:40000".into()],
        );
        assert!(text.contains("type nat hook output"), "{text}");
        assert!(text.contains("dnat ip to 198.18.0.2:40000"), "{text}");
        assert!(text.contains("ip saddr 198.18.0.11 drop"), "{text}");
        assert!(
            text.contains("ip saddr 198.18.0.11 tcp dport 7070 numgen random mod 100 < 50 drop"),
            "{text}"
        );
        assert!(
            text.contains("ip daddr 198.18.0.11 tcp sport 7070 numgen random mod 100 < 50 drop"),
            "{text}"
        );
        // Reloading replaces the table whole: no rule of an earlier cut survives.
        assert!(text.starts_with("table inet chaos\ndelete table inet chaos\n"));
    }
}
