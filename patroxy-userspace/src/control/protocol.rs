//! The runtime socket's line protocol, HAProxy's CLI habit: one command per connection, words
//! separated by spaces, `--json` anywhere for a JSON answer. Parsing is pure; `commands` runs
//! what is parsed.
//!
//! Every error answer is one line starting with `error: ` (or, with `--json`, an object with
//! an `error` key), so a script (or `patroxy ctl`) tells failure from success without a status
//! code, and `socat` shows it as it is.
use crate::operator_state::AdminState;

/// What `help` answers.
pub const HELP: &str = "\
commands (one per connection; add --json for a JSON answer):
  show servers                                 every listener's servers, as `patroxy status`
  show sessions                                the open sockmap sessions, as `patroxy sessions`
  set state <listener>/<server> ready|drain|maint
                                               a server's admin state, as `patroxy set-state`
                                               (HAProxy's `set server <l>/<s> state <state>` too)
  reload                                       re-read the configuration file and apply it
  help                                         this text
";

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    ShowServers,
    ShowSessions,
    SetState {
        listener: String,
        server: String,
        state: AdminState,
    },
    Reload,
}

/// A request line: the command (or why it is not one) and the answer's format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Result<Command, String>,
    pub json: bool,
}

/// Reads one request line (without its newline).
pub fn parse(line: &str) -> Request {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    let before = words.len();
    words.retain(|w| *w != "--json");
    Request {
        json: words.len() != before,
        command: command(&words),
    }
}

fn command(words: &[&str]) -> Result<Command, String> {
    match words {
        [] => Err("empty command; try `help`".into()),
        ["help"] => Ok(Command::Help),
        ["show", "servers"] => Ok(Command::ShowServers),
        ["show", "sessions"] => Ok(Command::ShowSessions),
        ["reload"] => Ok(Command::Reload),
        ["set", "state", target, state] | ["set", "server", target, "state", state] => {
            let (listener, server) = target
                .split_once('/')
                .ok_or_else(|| format!("expected <listener>/<server>, got {target:?}"))?;
            Ok(Command::SetState {
                listener: listener.into(),
                server: server.into(),
                state: state.parse().map_err(|e| format!("{e}"))?,
            })
        }
        ["set", ..] => Err("usage: set state <listener>/<server> ready|drain|maint".into()),
        _ => Err(format!(
            "unknown command {:?}; try `help`",
            command_words(words)
        )),
    }
}

/// The words that name the unknown command: `show` with what followed it, or the first word.
fn command_words(words: &[&str]) -> String {
    match words {
        ["show", what, ..] => format!("show {what}"),
        _ => words[0].to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> (Command, bool) {
        let r = parse(line);
        (r.command.unwrap_or_else(|e| panic!("{line}: {e}")), r.json)
    }

    fn err(line: &str) -> String {
        parse(line).command.expect_err(line)
    }

    #[test]
    fn commands_and_json_anywhere() {
        assert_eq!(ok("help"), (Command::Help, false));
        assert_eq!(ok("show servers"), (Command::ShowServers, false));
        assert_eq!(ok("  show   servers --json "), (Command::ShowServers, true));
        assert_eq!(ok("--json show sessions"), (Command::ShowSessions, true));
        assert_eq!(ok("reload"), (Command::Reload, false));
        let maint = Command::SetState {
            listener: "postgres_read".into(),
            server: "pg2".into(),
            state: AdminState::Maint,
        };
        assert_eq!(
            ok("set state postgres_read/pg2 maint"),
            (maint.clone(), false)
        );
        assert_eq!(
            ok("set server postgres_read/pg2 state MAINT"),
            (maint, false)
        );
    }

    #[test]
    fn errors_say_what_to_do() {
        assert_eq!(err(""), "empty command; try `help`");
        assert_eq!(
            err("show stat"),
            "unknown command \"show stat\"; try `help`"
        );
        assert_eq!(
            err("frobnicate now"),
            "unknown command \"frobnicate\"; try `help`"
        );
        assert_eq!(
            err("set state postgres_read-pg2 maint"),
            "expected <listener>/<server>, got \"postgres_read-pg2\""
        );
        assert!(err("set state a/b up").contains("unknown state \"up\""));
        assert!(err("set state a/b").starts_with("usage: set state"));
        assert!(
            parse("bogus --json").json,
            "an error is answered in JSON too"
        );
    }
}
