//! Go `flag` package compatibility: what `consul connect proxy` users type
//! (`-flag v`, `-flag=v`, bare booleans, Go's boolean and duration words)
//! turned into what clap parses.

use std::ffi::OsString;

use clap::Command;

/// Rewrites `-name` / `-name=value` to `--name` / `--name=value` for every
/// long flag of `root` and its subcommands, leaving the values of flags
/// alone (a value may start with `-`).
pub(super) fn go_style(mut root: Command, args: Vec<OsString>) -> Vec<OsString> {
    root.build();
    let mut cmd = &root;
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    out.extend(iter.next());
    let mut value_next = false;
    while let Some(arg) = iter.next() {
        if value_next {
            // Join as `--flag=value`: clap would read a value that starts
            // with `-` as another flag, Go's parser never does.
            value_next = false;
            if let Some(flag) = out.last_mut() {
                flag.push("=");
                flag.push(&arg);
            }
            continue;
        }
        let Some(s) = arg.to_str().map(str::to_string) else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            out.push(arg);
            out.extend(iter.by_ref());
            break;
        }
        let body = s.strip_prefix("--").or_else(|| s.strip_prefix('-'));
        match body {
            Some(body) if body.len() > 1 => {
                let (name, has_value) = match body.split_once('=') {
                    Some((n, _)) => (n, true),
                    None => (body, false),
                };
                if let Some(a) = cmd.get_arguments().find(|a| a.get_long() == Some(name)) {
                    let takes = a
                        .get_num_args()
                        .map(|r| r.min_values() > 0)
                        .unwrap_or(false);
                    value_next = takes && !has_value;
                }
                out.push(format!("--{body}").into());
            }
            _ => {
                if cmd.get_name() == root.get_name() {
                    if let Some(sub) = root.find_subcommand(&s) {
                        cmd = sub;
                    }
                }
                out.push(arg);
            }
        }
    }
    out
}

/// Go's `strconv.ParseBool`.
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}
