//! Log shipping's role as the instance carries it: the role kept in a file beside the data
//! directory (`DATA.logship.json`), the scripts PostgreSQL runs (`DATA.scripts/`), and the
//! settings the role puts into `postgresql.auto.conf`.
//!
//! Below both the instance, which applies these settings at every start, clone and restore
//! (those copy another instance's settings), and the jobs ([`crate::shipping`]), which set
//! the role: so neither needs the other.

use std::path::{Path, PathBuf};

use pchat_agent_api::shipping::ShippingRole;

use crate::config::AgentConfig;
use crate::AgentError;

/// `archive_command`'s script: `archive-wal.sh PATH NAME SHARE_DIR`.
pub const ARCHIVE_SCRIPT: &str = r#"#!/bin/sh
# pchat log shipping, backup job: archive one WAL file into the share.
# Written by pchat agent; run by PostgreSQL as archive_command. $1=%p $2=%f $3=share dir.
p=$1; f=$2; d=$3
if [ ! -d "$d" ] || [ ! -w "$d" ]; then
  echo "pchat archive: the share directory $d is missing or not writable by $(id -un)" >&2; exit 1
fi
# A segment that runs past the point where a newer timeline forked off its own (the old
# principal writing on after a failover promoted another) is refused: it is not the pool's
# history, and a backup that replayed it could never follow the new principal.
case "$f" in
  [0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F][0-9A-F])
    size=$(wc -c < "$p") || exit 1
    tli=$((0x$(printf %s "$f" | cut -c1-8)))
    end=$(( (0x$(printf %s "$f" | cut -c9-16) << 32) + (0x$(printf %s "$f" | cut -c17-24) + 1) * size ))
    for h in "$d"/*.history; do
      [ -f "$h" ] && [ ! -L "$h" ] || continue
      while read -r ptli lsn rest; do
        case "$ptli" in *[!0-9]*|'') continue ;; esac
        case "$lsn" in *[!0-9A-Fa-f/]*|''|*/*/*) continue ;; esac
        [ "$ptli" -eq "$tli" ] || continue
        sw=$(( (0x${lsn%/*} << 32) + 0x${lsn#*/} ))
        if [ "$end" -gt "$sw" ]; then
          echo "pchat archive: $f holds WAL past $lsn, where timeline $tli ended ($h): this instance wrote on after another was promoted; not archived — rebuild it as a mirror (pchat db mirror add)" >&2
          exit 1
        fi
      done < "$h"
    done
    ;;
esac
sum=$(sha256sum < "$p") || exit 1
sum=${sum%% *}
if [ -f "$d/$f" ]; then
  have=$(sha256sum < "$d/$f") || exit 1
  if [ "${have%% *}" != "$sum" ]; then
    echo "pchat archive: $d/$f already exists with other content; not overwritten" >&2; exit 1
  fi
else
  t="$d/.$f.$$.tmp"
  cp "$p" "$t" && sync "$t" && mv -f "$t" "$d/$f" || { rm -f "$t"; exit 1; }
fi
t="$d/.$f.sha256.$$.tmp"
printf '%s  %s\n' "$sum" "$f" > "$t" && sync "$t" && mv -f "$t" "$d/$f.sha256" && sync "$d" || { rm -f "$t"; exit 1; }
"#;

/// The copy job's per-file step, run as the OS user: `copy-wal.sh SHARE_DIR COPY_DIR NAME`.
/// Exit 2: not (wholly) shipped yet; 3: the file does not match its checksum; 1: I/O.
pub const COPY_SCRIPT: &str = r#"#!/bin/sh
# pchat log shipping, copy job: copy one shipped WAL file into the copy directory, verified.
# Written by pchat agent; run by it as the database's OS user. $1=share $2=copy dir $3=name.
s=$1; c=$2; f=$3
[ -f "$s/$f.sha256" ] && [ -f "$s/$f" ] || exit 2
want=$(cut -d' ' -f1 < "$s/$f.sha256") || exit 1
t="$c/.$f.tmp"
cp "$s/$f" "$t" || { rm -f "$t"; exit 1; }
have=$(sha256sum < "$t") || { rm -f "$t"; exit 1; }
if [ "${have%% *}" != "$want" ]; then rm -f "$t"; exit 3; fi
sync "$t" && mv -f "$t" "$c/$f" || { rm -f "$t"; exit 1; }
t="$c/.$f.sha256.tmp"
cp "$s/$f.sha256" "$t" && sync "$t" && mv -f "$t" "$c/$f.sha256" && sync "$c" || { rm -f "$t"; exit 1; }
"#;

/// `restore_command`'s script: `restore-wal.sh NAME PATH COPY_DIR`. A file without its
/// sidecar is not there yet; a file that does not match it is refused and named in
/// `COPY_DIR/.rejected`.
pub const RESTORE_SCRIPT: &str = r#"#!/bin/sh
# pchat log shipping, restore job: hand one verified WAL file to PostgreSQL.
# Written by pchat agent; run by PostgreSQL as restore_command. $1=%f $2=%p $3=copy dir.
f=$1; p=$2; c=$3
[ -f "$c/$f.sha256" ] && [ -f "$c/$f" ] || exit 1
want=$(cut -d' ' -f1 < "$c/$f.sha256") || exit 1
have=$(sha256sum < "$c/$f") || exit 1
if [ "${have%% *}" != "$want" ]; then
  echo "pchat restore: $c/$f does not match its checksum; not applied" >&2
  printf '%s\n' "$f" > "$c/.rejected"
  exit 1
fi
cp "$c/$f" "$p"
"#;

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn state_path(cfg: &AgentConfig) -> PathBuf {
    sibling(&cfg.data_dir, ".logship.json")
}

pub(crate) fn scripts_dir(cfg: &AgentConfig) -> PathBuf {
    sibling(&cfg.data_dir, ".scripts")
}

/// The role kept beside the data directory.
pub fn load_role(cfg: &AgentConfig) -> ShippingRole {
    std::fs::read(state_path(cfg))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub(crate) fn save_role(cfg: &AgentConfig, role: &ShippingRole) -> Result<(), AgentError> {
    let path = state_path(cfg);
    let tmp = sibling(&path, ".tmp");
    let json = serde_json::to_vec_pretty(role).map_err(|e| AgentError::Failed(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| AgentError::Io {
        context: format!("writing {}", tmp.display()),
        source: e,
    })?;
    std::fs::rename(&tmp, &path).map_err(|e| AgentError::Io {
        context: format!("replacing {}", path.display()),
        source: e,
    })
}

/// Writes the scripts (readable and executable by the OS user).
fn write_scripts(cfg: &AgentConfig) -> Result<PathBuf, AgentError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = scripts_dir(cfg);
    let io = |what: &str, p: &Path| {
        let context = format!("{what} {}", p.display());
        move |source| AgentError::Io { context, source }
    };
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io("setting the mode of", &dir))?;
    for (name, text) in [
        ("archive-wal.sh", ARCHIVE_SCRIPT),
        ("copy-wal.sh", COPY_SCRIPT),
        ("restore-wal.sh", RESTORE_SCRIPT),
    ] {
        let p = dir.join(name);
        if std::fs::read_to_string(&p).ok().as_deref() != Some(text) {
            std::fs::write(&p, text).map_err(io("writing", &p))?;
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(io("setting the mode of", &p))?;
    }
    Ok(dir)
}

fn quoted(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// The `postgresql.auto.conf` settings of a role.
pub(crate) fn settings(role: &ShippingRole, scripts: &Path) -> Vec<(&'static str, Option<String>)> {
    match role {
        ShippingRole::None => vec![
            ("archive_command", Some("/bin/true".into())),
            ("archive_timeout", None),
            ("restore_command", None),
            ("recovery_min_apply_delay", None),
            ("wal_retrieve_retry_interval", None),
        ],
        ShippingRole::Source {
            share_dir,
            backup_interval_s,
            ..
        } => vec![
            (
                "archive_command",
                Some(format!(
                    "/bin/sh {} \"%p\" \"%f\" {}",
                    quoted(&scripts.join("archive-wal.sh")),
                    quoted(Path::new(share_dir))
                )),
            ),
            ("archive_timeout", Some(format!("{backup_interval_s}s"))),
            ("restore_command", None),
            ("recovery_min_apply_delay", None),
            ("wal_retrieve_retry_interval", None),
        ],
        ShippingRole::Secondary {
            copy_dir,
            restore_delay_s,
            ..
        } => vec![
            // Received segments are archived again under `always`: into nowhere.
            ("archive_command", Some("/bin/true".into())),
            ("archive_timeout", None),
            (
                "restore_command",
                Some(format!(
                    "/bin/sh {} \"%f\" \"%p\" {}",
                    quoted(&scripts.join("restore-wal.sh")),
                    quoted(Path::new(copy_dir))
                )),
            ),
            (
                "recovery_min_apply_delay",
                Some(format!("{restore_delay_s}s")),
            ),
            // A segment not copied yet is asked for again after this long.
            ("wal_retrieve_retry_interval", Some("1s".into())),
        ],
    }
}

/// The settings of the instance's current role, with the scripts they name written first.
pub(crate) fn role_settings(
    cfg: &AgentConfig,
) -> Result<Vec<(&'static str, Option<String>)>, AgentError> {
    let role = load_role(cfg);
    let scripts = write_scripts(cfg)?;
    Ok(settings(&role, &scripts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_quote_paths() {
        let role = ShippingRole::Source {
            share_dir: "/srv/share/wal/x".into(),
            backup_interval_s: 5,
            retention_h: 72,
        };
        let s = settings(&role, Path::new("/var/lib/pchat/pg.scripts"));
        assert_eq!(
            s[0].1.as_deref(),
            Some("/bin/sh '/var/lib/pchat/pg.scripts/archive-wal.sh' \"%p\" \"%f\" '/srv/share/wal/x'")
        );
        assert_eq!(s[1].1.as_deref(), Some("5s"));
    }
}
