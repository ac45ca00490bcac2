//! The layer rules of ARCHITECTURE.md ("Architecture invariants"), checked on the workspace's
//! own `Cargo.toml` files and sources, so that a change which breaks one fails here with the
//! file and line, instead of being found in review (or not at all):
//!
//! - every crate has a layer: pure < storage < pool < runtime, and the crates apart;
//! - a crate depends only on its own layer or the ones below (the pool crates in a fixed
//!   order), pure crates on no async or I/O crate, the crates apart on no pchat crate;
//! - SQL on the tables of `mgc`/`mgccomp` appears only in `crates/pchat-store-*`, and the
//!   data-directory lock (`pchat.lock`) is taken only through `pchat-store-sqlite`;
//! - PostgreSQL and etcd are administered only by the pool crates, and only
//!   `pchat-control` speaks etcd's protocol.
//!
//! The source checks read string literals, not comments: prose may name a table or a tool,
//! code may not use them. They look at each crate's `src/` (tests may read, fill or break the
//! databases directly: an outside view is what a check needs) and skip the test kit and the
//! chaos suite, which start real PostgreSQL and etcd clusters, watch them from outside and
//! share no code with pchat.
//! Each detector is also run on fixtures taken from code it must catch (the salvage's queries
//! as they were in the agent) and prose it must let pass.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where a crate sits. Dependencies point down (to a smaller layer) or sideways, never up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    /// No I/O, no async, no clock: the protocol and the domain.
    Pure,
    /// The store trait and its backends.
    Storage,
    /// Control plane, agent API, procedures, agent.
    Pool,
    /// The server and the binary.
    Runtime,
    /// The load generator and the test kit: no pchat dependency at all.
    Apart,
}

const LAYERS: &[(&str, Layer)] = &[
    ("pchat-xmpp", Layer::Pure),
    ("pchat-room", Layer::Pure),
    ("pchat-muc", Layer::Pure),
    ("pchat-tls", Layer::Storage),
    ("pchat-store", Layer::Storage),
    ("pchat-store-sqlite", Layer::Storage),
    ("pchat-store-postgres", Layer::Storage),
    ("pchat-control", Layer::Pool),
    ("pchat-agent-api", Layer::Pool),
    ("pchat-procedures", Layer::Pool),
    ("pchat-agent", Layer::Pool),
    ("pchat-server", Layer::Runtime),
    ("pchat", Layer::Runtime),
    ("pchat-bench", Layer::Apart),
    ("pchat-testkit", Layer::Apart),
    ("pchat-chaos", Layer::Apart),
];

/// Dev-only harnesses that judge pchat from outside and share no code with it: any crate's
/// tests may use them. The chaos suite drives the pool through the test kit's client.
const HARNESSES: &[&str] = &["pchat-testkit", "pchat-chaos"];

/// Inside the pool layer the order is fixed: each crate may use only those before it.
/// (`pchat-agent` uses `pchat-procedures`: its automatic failover runs the mirror failover's
/// steps, and its backups write the procedures' backup sets.)
const POOL_ORDER: &[&str] = &[
    "pchat-control",
    "pchat-agent-api",
    "pchat-procedures",
    "pchat-agent",
];

/// Pool crates the server may use: the control plane, and of the procedures only the
/// overview read from etcd for its dashboard (it never talks to an agent:
/// `the_server_uses_of_the_procedures_only_the_overview` checks its sources).
const SERVER_POOL_DEPS: &[&str] = &["pchat-control", "pchat-procedures"];

/// What the server may name of `pchat_procedures`: the etcd-only overview and the step
/// type its reports hold.
const SERVER_PROCEDURES_USE: &[&str] = &["overview", "steps::Step"];

/// Crates that do I/O or run async code: a pure crate depends on none of them.
const IO_CRATES: &[&str] = &[
    "tokio",
    "async-trait",
    "futures",
    "futures-util",
    "mio",
    "socket2",
    "nix",
    "rusqlite",
    "tokio-postgres",
    "postgres",
    "reqwest",
    "hyper",
    "axum",
    "tungstenite",
    "rustls",
    "tracing-subscriber",
    "etcd-client",
];

/// PostgreSQL's and etcd's administration tools: a string naming one (as a program to run)
/// outside the pool crates is administration done elsewhere.
const ADMIN_TOOLS: &[&str] = &[
    "initdb",
    "pg_ctl",
    "pg_ctlcluster",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
    "pg_resetwal",
    "pg_receivewal",
    "pg_archivecleanup",
    "pg_upgrade",
    "etcdctl",
];

/// SQL that administers a PostgreSQL instance rather than using pchat's databases.
const ADMIN_SQL: &[&str] = &[
    "alter system",
    "pg_promote",
    "pg_create_physical_replication_slot",
    "pg_drop_replication_slot",
    "pg_switch_wal",
    "pg_reload_conf",
    "pg_terminate_backend",
];

/// etcd's v3 JSON gateway: only `pchat-control`'s client speaks it.
const ETCD_PATHS: &[&str] = &[
    "/v3/kv",
    "/v3/lease",
    "/v3/watch",
    "/v3/auth",
    "/v3/cluster",
    "/v3/maintenance",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---------------------------------------------------------------------------------------------
// Manifests

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Normal,
    Build,
    Dev,
}

#[derive(Debug)]
struct Manifest {
    name: String,
    dir: PathBuf,
    deps: Vec<(Section, String)>,
}

fn parse_manifest(dir: &Path, text: &str) -> Manifest {
    let doc: toml::Table =
        toml::from_str(text).unwrap_or_else(|e| panic!("{}/Cargo.toml: {e}", dir.display()));
    let name = doc
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_else(|| panic!("{}/Cargo.toml has no package name", dir.display()))
        .to_owned();
    let mut deps = Vec::new();
    let mut tables = vec![&doc];
    // `[target.'cfg(…)'.dependencies]` count as much as the plain sections.
    if let Some(targets) = doc.get("target").and_then(|t| t.as_table()) {
        tables.extend(targets.values().filter_map(|t| t.as_table()));
    }
    for table in tables {
        for (key, section) in [
            ("dependencies", Section::Normal),
            ("build-dependencies", Section::Build),
            ("dev-dependencies", Section::Dev),
        ] {
            if let Some(t) = table.get(key).and_then(|t| t.as_table()) {
                for (dep, spec) in t {
                    // A renamed dependency (`alias = { package = "real" }`) is the real crate.
                    let real = spec.get("package").and_then(|p| p.as_str()).unwrap_or(dep);
                    deps.push((section, real.to_owned()));
                }
            }
        }
    }
    Manifest {
        name,
        dir: dir.to_path_buf(),
        deps,
    }
}

fn manifests() -> Vec<Manifest> {
    let crates = workspace().join("crates");
    let mut out: Vec<Manifest> = std::fs::read_dir(&crates)
        .unwrap_or_else(|e| panic!("{}: {e}", crates.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .map(|dir| {
            let text = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
            parse_manifest(&dir, &text)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn layer_of(name: &str) -> Option<Layer> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

fn is_pchat(name: &str) -> bool {
    name == "pchat" || name.starts_with("pchat-")
}

/// Every rule on one crate's dependencies, as messages naming the edge and the rule.
fn dependency_violations(m: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    let Some(layer) = layer_of(&m.name) else {
        return vec![format!(
            "crate {} has no layer: add it to LAYERS in crates/pchat/tests/layers.rs and to \
             ARCHITECTURE.md's code map",
            m.name
        )];
    };
    for (section, dep) in &m.deps {
        let edge = format!("{} -> {dep} ({section:?})", m.name);
        if is_pchat(dep) {
            let Some(dep_layer) = layer_of(dep) else {
                out.push(format!("{edge}: {dep} has no layer"));
                continue;
            };
            // The harnesses are dev-only and depend on nothing of pchat (the chaos suite only
            // on the test kit): any crate may test with them.
            if HARNESSES.contains(&dep.as_str()) && *section == Section::Dev {
                continue;
            }
            if m.name == "pchat-chaos" && dep == "pchat-testkit" {
                continue;
            }
            if layer == Layer::Apart {
                out.push(format!(
                    "{edge}: {} depends on no pchat crate, so it cannot share (and hide) pchat's bugs",
                    m.name
                ));
            } else if dep_layer == Layer::Apart {
                out.push(format!("{edge}: nothing depends on the crates apart"));
            } else if dep_layer > layer {
                out.push(format!(
                    "{edge}: a {layer:?} crate depends on a {dep_layer:?} crate above it"
                ));
            } else if layer == Layer::Pool && dep_layer == Layer::Pool {
                let pos = |n: &str| POOL_ORDER.iter().position(|p| *p == n);
                if pos(dep) >= pos(&m.name) {
                    out.push(format!(
                        "{edge}: inside the pool layer a crate uses only those before it in \
                         {POOL_ORDER:?}"
                    ));
                }
            } else if m.name == "pchat-server"
                && dep_layer == Layer::Pool
                && !SERVER_POOL_DEPS.contains(&dep.as_str())
            {
                out.push(format!(
                    "{edge}: the server uses only {SERVER_POOL_DEPS:?} of the pool crates"
                ));
            }
        } else if layer == Layer::Pure
            && *section != Section::Dev
            && IO_CRATES.contains(&dep.as_str())
        {
            out.push(format!(
                "{edge}: a pure crate does no I/O and runs no async code"
            ));
        }
    }
    out
}

#[test]
fn every_crate_has_a_layer_and_every_layer_entry_a_crate() {
    let names: BTreeSet<String> = manifests().into_iter().map(|m| m.name).collect();
    let listed: BTreeSet<String> = LAYERS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        names, listed,
        "the workspace's crates and LAYERS differ: place a new crate in a layer (and in \
         ARCHITECTURE.md's code map), drop a removed one"
    );
}

#[test]
fn crates_depend_only_on_their_layer_or_below() {
    let manifests = manifests();
    assert!(manifests.len() >= LAYERS.len(), "{manifests:?}");
    let violations: Vec<String> = manifests.iter().flat_map(dependency_violations).collect();
    assert!(
        violations.is_empty(),
        "layer rules broken (ARCHITECTURE.md, \"Architecture invariants\"):\n{}",
        violations.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Sources

/// The string literals of a Rust source file with their line numbers, escapes resolved;
/// comments (doc comments included) are skipped.
fn string_literals(src: &str) -> Vec<(usize, String)> {
    let b: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && next == Some('r'))) && (i == 0 || !ident(b[i - 1])) && {
            let mut j = i + if c == 'b' { 2 } else { 1 };
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            b.get(j) == Some(&'"')
        } {
            // Raw string: r"…", r#"…"#, br"…".
            let mut j = i + if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while b[j] == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            let start_line = line;
            let mut text = String::new();
            while j < b.len() {
                if b[j] == '"' && (1..=hashes).all(|k| b.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                if b[j] == '\n' {
                    line += 1;
                }
                text.push(b[j]);
                j += 1;
            }
            out.push((start_line, text));
            i = j;
        } else if c == '"' {
            let start_line = line;
            let mut text = String::new();
            let mut j = i + 1;
            while j < b.len() && b[j] != '"' {
                if b[j] == '\\' {
                    match b.get(j + 1) {
                        // A line continuation skips the newline and the next line's indent.
                        Some('\n') => {
                            line += 1;
                            j += 2;
                            while j < b.len() && b[j].is_whitespace() {
                                if b[j] == '\n' {
                                    line += 1;
                                }
                                j += 1;
                            }
                            continue;
                        }
                        Some('n') => text.push('\n'),
                        Some('t') => text.push('\t'),
                        Some(&e) => text.push(e),
                        None => {}
                    }
                    j += 2;
                } else {
                    if b[j] == '\n' {
                        line += 1;
                    }
                    text.push(b[j]);
                    j += 1;
                }
            }
            out.push((start_line, text));
            i = j + 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\'', '"') is skipped whole; a lifetime is not one.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ident(c) {
            // Skip whole identifiers, so the `r`/`b` of a name never starts a raw string.
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether a literal is an SQL statement: it starts with an upper-case SQL verb, as all of
/// pchat's SQL does, and prose almost never does ("select a room from the list").
fn is_sql(lit: &str) -> bool {
    const VERBS: &[&str] = &[
        "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "COPY", "TRUNCATE", "ALTER", "CREATE",
        "DROP", "MERGE",
    ];
    let first: String = lit
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    VERBS.contains(&first.as_str())
}

/// The tables of `tables` an SQL statement reads or writes (named after FROM, JOIN, INTO,
/// UPDATE, TABLE or TRUNCATE, optionally schema-qualified or quoted).
fn tables_used(sql: &str, tables: &BTreeSet<String>) -> Vec<String> {
    let words: Vec<String> = sql
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let mut found = Vec::new();
    for (k, w) in words.iter().enumerate() {
        if !matches!(
            w.as_str(),
            "from" | "join" | "into" | "update" | "table" | "truncate"
        ) {
            continue;
        }
        let mut rest = words[k + 1..]
            .iter()
            .skip_while(|w| matches!(w.as_str(), "only" | "if" | "not" | "exists" | "public"));
        if let Some(t) = rest.next() {
            if tables.contains(t) {
                found.push(t.clone());
            }
        }
    }
    found
}

/// Whether a literal runs an administration tool: it is a program name or path ending in one.
fn names_admin_tool(lit: &str) -> Option<&'static str> {
    let t = lit.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return None;
    }
    let program = t.rsplit('/').next().unwrap_or(t);
    ADMIN_TOOLS.iter().copied().find(|tool| *tool == program)
}

fn admin_sql(lit: &str) -> Option<&'static str> {
    if !is_sql(lit) {
        return None;
    }
    let l = lit.to_ascii_lowercase();
    ADMIN_SQL.iter().copied().find(|s| l.contains(s))
}

fn etcd_path(lit: &str) -> Option<&'static str> {
    ETCD_PATHS.iter().copied().find(|p| lit.contains(p))
}

/// The tables the store crates' migrations create: the tables of `mgc` and `mgccomp`.
fn pchat_tables() -> BTreeSet<String> {
    let mut tables = BTreeSet::new();
    let crates = workspace().join("crates");
    for entry in std::fs::read_dir(&crates)
        .expect("crates")
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("pchat-store-") {
            continue;
        }
        for file in files(&entry.path().join("migrations"), "sql") {
            let text = std::fs::read_to_string(&file).expect("migration");
            let words: Vec<String> = text
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .map(str::to_ascii_lowercase)
                .collect();
            for k in 0..words.len().saturating_sub(2) {
                if words[k] == "create" && words[k + 1] == "table" {
                    let t = words[k + 2..]
                        .iter()
                        .find(|w| !matches!(w.as_str(), "if" | "not" | "exists" | "public"));
                    tables.extend(t.cloned());
                }
            }
        }
    }
    tables
}

/// Every file under `dir` with the extension `ext`.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Each crate's name and its product sources (`src/**/*.rs`, `build.rs`).
fn sources() -> Vec<(String, PathBuf, String)> {
    let root = workspace();
    let mut out = Vec::new();
    for m in manifests() {
        let mut paths = files(&m.dir.join("src"), "rs");
        if m.dir.join("build.rs").is_file() {
            paths.push(m.dir.join("build.rs"));
        }
        for p in paths {
            let text = std::fs::read_to_string(&p).expect("source");
            let shown = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            out.push((m.name.clone(), PathBuf::from(shown), text));
        }
    }
    out
}

/// SQL on `mgc`/`mgccomp` tables in one file's literals.
fn sql_violations(path: &Path, src: &str, tables: &BTreeSet<String>) -> Vec<String> {
    string_literals(src)
        .into_iter()
        .filter(|(_, lit)| is_sql(lit))
        .filter_map(|(line, lit)| {
            let used = tables_used(&lit, tables);
            (!used.is_empty()).then(|| {
                format!(
                    "{}:{line}: SQL on {used:?}: only crates/pchat-store-* know the schema; \
                     export a function from the store crate and call it",
                    path.display()
                )
            })
        })
        .collect()
}

/// PostgreSQL or etcd administration in one file's literals; `etcd_allowed` for the crate
/// whose client speaks etcd's protocol, `admin_allowed` for the pool crates.
fn admin_violations(
    path: &Path,
    src: &str,
    admin_allowed: bool,
    etcd_allowed: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (line, lit) in string_literals(src) {
        let at = format!("{}:{line}", path.display());
        if !admin_allowed {
            if let Some(tool) = names_admin_tool(&lit) {
                out.push(format!(
                    "{at}: runs `{tool}`: only the pool crates administer PostgreSQL and etcd (the agent does)"
                ));
            }
            if let Some(s) = admin_sql(&lit) {
                out.push(format!(
                    "{at}: `{s}` administers PostgreSQL: only the pool crates do (the agent does)"
                ));
            }
        }
        if !etcd_allowed {
            if let Some(p) = etcd_path(&lit) {
                out.push(format!(
                    "{at}: speaks etcd's gateway ({p}): use pchat_control::Etcd"
                ));
            }
        }
    }
    out
}

#[test]
fn sql_on_pchat_tables_lives_in_the_store_crates() {
    let tables = pchat_tables();
    for t in ["room", "message", "compliance", "user_account"] {
        assert!(
            tables.contains(t),
            "the migrations no longer create `{t}`? found {tables:?}"
        );
    }
    let violations: Vec<String> = sources()
        .iter()
        .filter(|(krate, _, _)| !krate.starts_with("pchat-store-"))
        .flat_map(|(_, path, src)| sql_violations(path, src, &tables))
        .collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// The SQLite store's lock file, named as a path outside the store: a second
/// implementation of its lock protocol (the standalone restore had one).
fn lock_violations(path: &Path, src: &str) -> Vec<String> {
    string_literals(src)
        .into_iter()
        .filter(|(_, lit)| lit.trim() == "pchat.lock")
        .map(|(line, _)| {
            format!(
                "{}:{line}: opens pchat.lock itself: take the lock with \
                 pchat_store_sqlite::lock_data_dir",
                path.display()
            )
        })
        .collect()
}

#[test]
fn the_data_directory_lock_lives_in_the_sqlite_store() {
    let violations: Vec<String> = sources()
        .iter()
        .filter(|(krate, _, _)| krate != "pchat-store-sqlite")
        .flat_map(|(_, path, src)| lock_violations(path, src))
        .collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn postgres_and_etcd_administration_lives_in_the_pool_crates() {
    let violations: Vec<String> = sources()
        .iter()
        .filter(|(krate, _, _)| !HARNESSES.contains(&krate.as_str()))
        .flat_map(|(krate, path, src)| {
            let admin_allowed = layer_of(krate) == Some(Layer::Pool);
            let etcd_allowed = krate == "pchat-control";
            admin_violations(path, src, admin_allowed, etcd_allowed)
        })
        .collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The detectors on what they must catch and what they must let pass

/// The salvage's comparison and the status's message count as the agent had them before
/// they moved into `pchat_store_postgres::inspect`, verbatim.
const OLD_AGENT_SQL: &str = r##"
        let sql_keys = "SELECT r.jid, m.seq, m.at FROM message m JOIN room r ON r.id = m.room_id \
                        WHERE m.at >= $1";
        let rows = mine
            .query(
                "SELECT r.jid, m.seq, m.at, m.sender, m.nick, m.origin_id, m.body, m.stanza \
                 FROM message m JOIN room r ON r.id = m.room_id WHERE m.at >= $1 \
                 ORDER BY r.jid, m.seq",
                &[&req.since_us],
            )
            .await
            .map_err(pg)?;
        let row = c
            .query_one("SELECT coalesce(sum(last_seq), 0)::bigint FROM room", &[])
            .await
            .ok()?;
"##;

/// Prose and administration SQL that name tables without using them.
const PROSE: &str = r##"
    /// Reads `SELECT … FROM message` through the store; see `room` and `message`.
    // SELECT count(*) FROM room  (a comment)
    /* INSERT INTO message … */
    let quote = '"'; let life: &'static str = "fine";
    eprintln!("created the cluster (initdb); start it with `pchat agent start`");
    let e = "select a room from room list";
    let q = "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('mgc', 'mgccomp')";
    let r = r#"the room "x" is gone"#;
"##;

#[test]
fn literals_are_read_and_comments_skipped() {
    let lits: Vec<String> = string_literals(PROSE).into_iter().map(|(_, l)| l).collect();
    assert_eq!(
        lits,
        vec![
            "fine",
            "created the cluster (initdb); start it with `pchat agent start`",
            "select a room from room list",
            "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('mgc', 'mgccomp')",
            "the room \"x\" is gone",
        ]
    );
    let old = string_literals(OLD_AGENT_SQL);
    assert_eq!(old[0].0, 2, "line numbers");
    assert_eq!(
        old[0].1,
        "SELECT r.jid, m.seq, m.at FROM message m JOIN room r ON r.id = m.room_id WHERE m.at >= $1",
        "a line continuation skips the newline and the indent"
    );
}

#[test]
fn the_sql_check_catches_the_old_salvage_and_spares_prose() {
    let tables: BTreeSet<String> = ["room", "message", "user", "compliance"]
        .map(String::from)
        .into();
    let caught = sql_violations(Path::new("salvage.rs"), OLD_AGENT_SQL, &tables);
    assert_eq!(caught.len(), 3, "{caught:#?}");
    assert!(caught[0].starts_with("salvage.rs:2: SQL on [\"message\", \"room\"]"));
    assert!(caught[2].contains("[\"room\"]"));
    assert_eq!(
        sql_violations(Path::new("prose.rs"), PROSE, &tables),
        Vec::<String>::new()
    );
    assert_eq!(
        tables_used("UPDATE \"user\" SET x = 1", &tables),
        vec!["user"]
    );
    assert_eq!(
        tables_used(
            "CREATE TABLE IF NOT EXISTS public.compliance (id int)",
            &tables
        ),
        vec!["compliance"]
    );
}

#[test]
fn the_lock_check_catches_the_old_restore_and_spares_its_message() {
    // The standalone restore's lock as it was in the procedures, and its error message.
    let old = r##"
    let conn = rusqlite::Connection::open(dir.join("pchat.lock")).map_err(sqlite)?;
    #[error("a pchat server is running on {0} (it holds pchat.lock): stop the server first")]
    "##;
    let caught = lock_violations(Path::new("backup.rs"), old);
    assert_eq!(caught.len(), 1, "{caught:#?}");
    assert!(caught[0].starts_with("backup.rs:2: "));
}

#[test]
fn the_admin_check_catches_tools_sql_and_etcd_and_spares_prose() {
    let code = r##"
        let mut c = self.tool("pg_ctl");
        Command::new("/usr/lib/postgresql/15/bin/initdb");
        c.batch_execute("SELECT pg_reload_conf()");
        c.batch_execute("ALTER SYSTEM RESET primary_conninfo");
        self.call("/v3/kv/range", body);
    "##;
    let caught = admin_violations(Path::new("x.rs"), code, false, false);
    assert_eq!(caught.len(), 5, "{caught:#?}");
    assert!(caught[0].contains("`pg_ctl`") && caught[1].contains("`initdb`"));
    assert_eq!(
        admin_violations(Path::new("x.rs"), code, true, true),
        Vec::<String>::new()
    );
    assert_eq!(
        admin_violations(Path::new("prose.rs"), PROSE, false, false),
        Vec::<String>::new()
    );
}

/// Uses of `pchat_procedures` in one file other than [`SERVER_PROCEDURES_USE`].
fn procedures_uses(path: &Path, src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        // Prose may name any of it.
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("pchat_procedures") {
            let after = rest[at + "pchat_procedures".len()..].trim_start_matches("::");
            if !SERVER_PROCEDURES_USE.iter().any(|u| after.starts_with(u)) {
                out.push(format!(
                    "{}:{}: the server uses pchat_procedures beyond {SERVER_PROCEDURES_USE:?}: it never drives a procedure or talks to an agent",
                    path.display(),
                    i + 1
                ));
            }
            rest = &rest[at + 1..];
        }
    }
    out
}

#[test]
fn the_server_uses_of_the_procedures_only_the_overview() {
    let mut bad = Vec::new();
    for (krate, path, src) in sources() {
        if krate == "pchat-server" {
            bad.extend(procedures_uses(&path, &src));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // And it catches what it must.
    let p = Path::new("x.rs");
    assert!(procedures_uses(p, "use pchat_procedures::overview::{self, Overview};").is_empty());
    assert_eq!(
        procedures_uses(p, "pchat_procedures::mirror::failover(&ctx)").len(),
        1
    );
    assert_eq!(
        procedures_uses(p, "use pchat_procedures::{overview, dr};").len(),
        1
    );
}

#[test]
fn the_dependency_check_catches_what_it_must() {
    let check = |name: &str, deps: &str| {
        let text = format!("[package]\nname = \"{name}\"\n{deps}");
        dependency_violations(&parse_manifest(Path::new(name), &text))
    };
    // pchat-muc as it was: the store crate only for two types, and tokio with it.
    assert_eq!(
        check(
            "pchat-muc",
            "[dependencies]\npchat-room.workspace = true\npchat-store.workspace = true\n"
        )
        .len(),
        1
    );
    assert_eq!(
        check(
            "pchat-room",
            "[dependencies]\ntokio = { version = \"1\" }\n"
        )
        .len(),
        1
    );
    // The old pool crate has no layer; the agent API may not use the procedures.
    assert_eq!(check("pchat-pool", "").len(), 1);
    assert_eq!(
        check(
            "pchat-agent-api",
            "[dependencies]\npchat-procedures.workspace = true\n"
        )
        .len(),
        1
    );
    assert_eq!(
        check(
            "pchat-server",
            "[dependencies]\npchat-agent-api.workspace = true\n"
        )
        .len(),
        1
    );
    assert_eq!(
        check(
            "pchat-testkit",
            "[dev-dependencies]\npchat-xmpp.workspace = true\n"
        )
        .len(),
        1
    );
    assert_eq!(
        check(
            "pchat-store",
            "[target.'cfg(unix)'.dependencies]\npchat-control.workspace = true\n"
        )
        .len(),
        1
    );
    // What is allowed stays allowed.
    assert_eq!(
        check(
            "pchat-agent",
            "[dependencies]\npchat-procedures.workspace = true\ntokio.workspace = true\n\
             [dev-dependencies]\npchat-testkit.workspace = true\n"
        ),
        Vec::<String>::new()
    );
}
