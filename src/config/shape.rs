//! Reading the configuration tree into typed settings with every problem of its shape (a
//! missing key, a wrong type, an unknown key or value), each once and named as the user wrote
//! it (`budgets[1].period`, `kafka.topic`), instead of only the first one.
//!
//! serde stops at the first error, so after each one the part at fault is set aside and the
//! tree is read again: a missing key gets an empty placeholder, a wrong value is dropped (its
//! default applies, or it becomes missing), a list entry that still fails is dropped whole, a
//! section that still fails is emptied. Whatever was set aside is only ever used to read on:
//! a tree with problems never becomes settings anyone runs with.

use std::collections::{HashMap, HashSet};

use config::{Value, ValueKind};
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

/// One step of a key: a table key or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Step {
    Key(String),
    Index(usize),
}

type Path = Vec<Step>;

/// What went wrong at a path, without the `config` crate's own rendering of the key.
enum Issue {
    /// A required key is absent.
    Missing(String),
    /// A key the settings do not have; the message lists the ones they do.
    Unknown(String, String),
    /// A value that does not fit.
    Invalid(String),
}

/// The outcome of [`read`]: the value read (with placeholders if there were problems), every
/// problem, and the keys whose later validation problems would only echo a problem here.
pub(super) struct Shaped<T> {
    /// The settings; built from a patched tree when `problems` is not empty.
    pub value: Option<T>,
    /// One line per problem, `key: what is wrong`, in key order (`list[2]` before `list[10]`).
    pub problems: Vec<String>,
    /// Keys (as shown) that were set aside or renumbered: validation problems under them echo
    /// a problem already reported, or name an entry by a shifted index.
    pub set_aside: Vec<String>,
}

/// More rounds than any file has problems; a safety net against a loop that makes no progress.
const MAX_ROUNDS: usize = 500;

/// Reads `tree` as `T`, collecting every problem of its shape (see the module documentation).
pub(super) fn read<T: DeserializeOwned>(mut tree: Value) -> Shaped<T> {
    let mut problems: Vec<(Path, String)> = Vec::new();
    // Both by the path as the user wrote it: list entries move up when one is set aside.
    let mut reported: HashSet<Path> = HashSet::new();
    let mut placeholders: HashSet<Path> = HashSet::new();
    let mut silenced: Vec<Path> = Vec::new();
    // Per list (by its path), the original index of each entry still in the tree.
    let mut survivors: HashMap<Path, Vec<usize>> = HashMap::new();
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, T>(tree.clone()) {
            Ok(value) => return finish(Some(value), problems, &reported, &survivors, &silenced),
            Err(e) => e,
        };
        let at = path_of(error.path());
        let issue = issue_of(error.inner());
        let (target, message) = match &issue {
            Issue::Missing(field) => (child(&at, field), "missing; this key is required".to_owned()),
            // serde_path_to_error's path already ends at the unknown key.
            Issue::Unknown(field, message) if at.last() == Some(&Step::Key(field.clone())) => {
                (at.clone(), message.clone())
            }
            Issue::Unknown(field, message) => (child(&at, field), message.clone()),
            Issue::Invalid(message) => (at.clone(), message.clone()),
        };
        let written = original(&target, &survivors);
        let quiet = reported.contains(&written) || silenced.iter().any(|s| target.starts_with(s));
        if !quiet {
            problems.push((written.clone(), message));
            reported.insert(written.clone());
        }
        let fixed = match issue {
            Issue::Missing(_) if !placeholders.contains(&written) => {
                placeholders.insert(written);
                insert(&mut tree, &target, Value::new(None, ValueKind::String(String::new())))
            }
            Issue::Unknown(..) => remove(&mut tree, &target),
            Issue::Invalid(_) if !placeholders.contains(&written) && target.len() > 1 && remove(&mut tree, &target) => {
                placeholders.insert(written);
                true
            }
            _ => {
                let done = set_aside_container(&mut tree, &target, &mut survivors, &mut silenced);
                // An emptied section starts over: its keys get placeholders again, quietly.
                placeholders.retain(|p| !silenced.iter().any(|s| p.starts_with(s)));
                done
            }
        };
        if !fixed {
            break;
        }
    }
    if problems.is_empty() {
        problems.push((Path::new(), "the configuration cannot be read".to_owned()));
    }
    finish(None, problems, &reported, &survivors, &silenced)
}

fn finish<T>(
    value: Option<T>,
    mut problems: Vec<(Path, String)>,
    reported: &HashSet<Path>,
    survivors: &HashMap<Path, Vec<usize>>,
    silenced: &[Path],
) -> Shaped<T> {
    problems.sort();
    let mut set_aside: Vec<String> = reported.iter().map(|p| show(p)).collect();
    set_aside.extend(survivors.keys().chain(silenced).map(|p| show(p)));
    Shaped {
        value,
        problems: problems
            .into_iter()
            .map(|(key, message)| {
                if key.is_empty() {
                    message
                } else {
                    format!("{}: {message}", show(&key))
                }
            })
            .collect(),
        set_aside,
    }
}

/// The error's path as steps; an enum variant or an unknown step names nothing the user wrote.
fn path_of(path: &serde_path_to_error::Path) -> Path {
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// The problem itself, without the `config` crate's key (which [`path_of`] gives better).
fn issue_of(error: &config::ConfigError) -> Issue {
    use config::ConfigError as E;
    match error {
        // The key is the path from where the error arose; its last step is the missing field.
        E::NotFound(key) => Issue::Missing(key.rsplit(['.', ']']).next().unwrap_or(key).to_owned()),
        E::Type {
            unexpected, expected, ..
        } => Issue::Invalid(format!("invalid type: {unexpected}, expected {expected}")),
        E::At { error, .. } => issue_of(error),
        E::Message(message) => match unknown_field(message) {
            Some((field, rest)) => Issue::Unknown(field.to_owned(), format!("unknown key{rest}")),
            None => Issue::Invalid(message.clone()),
        },
        other => Issue::Invalid(other.to_string()),
    }
}

/// serde's "unknown field `x`, expected one of ..." as (`x`, ", expected one of ...").
fn unknown_field(message: &str) -> Option<(&str, &str)> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    Some((&rest[..end], &rest[end + 1..]))
}

fn child(path: &[Step], field: &str) -> Path {
    let mut path = path.to_vec();
    path.push(Step::Key(field.to_owned()));
    path
}

/// `path` with list indices as the user wrote them, before entries were set aside.
fn original(path: &[Step], survivors: &HashMap<Path, Vec<usize>>) -> Path {
    let mut shown = Vec::with_capacity(path.len());
    for (i, step) in path.iter().enumerate() {
        shown.push(match step {
            Step::Index(n) => Step::Index(
                survivors
                    .get(&path[..i])
                    .and_then(|alive| alive.get(*n).copied())
                    .unwrap_or(*n),
            ),
            key => key.clone(),
        });
    }
    shown
}

/// `kafka.topic`, `budgets[1].period`, `kafka.properties."sasl.password"`.
fn show(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Index(n) => out.push_str(&format!("[{n}]")),
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if plain {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
        }
    }
    out
}

fn get_mut<'a>(tree: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(tree, |node, step| match (&mut node.kind, step) {
        (ValueKind::Table(table), Step::Key(key)) => table.get_mut(key),
        (ValueKind::Array(list), Step::Index(i)) => list.get_mut(*i),
        _ => None,
    })
}

fn insert(tree: &mut Value, path: &[Step], value: Value) -> bool {
    let Some((Step::Key(key), parent)) = path.split_last() else {
        return false;
    };
    match get_mut(tree, parent).map(|p| &mut p.kind) {
        Some(ValueKind::Table(table)) => table.insert(key.clone(), value).is_none(),
        _ => false,
    }
}

fn remove(tree: &mut Value, path: &[Step]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match (get_mut(tree, parent).map(|p| &mut p.kind), last) {
        (Some(ValueKind::Table(table)), Step::Key(key)) => table.remove(key).is_some(),
        (Some(ValueKind::Array(list)), Step::Index(i)) if *i < list.len() => {
            list.remove(*i);
            true
        }
        _ => false,
    }
}

/// The last resort for a problem its own key cannot absorb: drops the outermost list entry
/// holding it, or else empties its section (whose missing keys then get placeholders quietly).
fn set_aside_container(
    tree: &mut Value,
    target: &[Step],
    survivors: &mut HashMap<Path, Vec<usize>>,
    silenced: &mut Vec<Path>,
) -> bool {
    if let Some(at) = target.iter().position(|s| matches!(s, Step::Index(_))) {
        let (list, Step::Index(i)) = (&target[..at], &target[at]) else {
            unreachable!("position found an index")
        };
        let Some(ValueKind::Array(entries)) = get_mut(tree, list).map(|v| &mut v.kind) else {
            return false;
        };
        let count = entries.len();
        let alive = survivors.entry(list.to_vec()).or_insert_with(|| (0..count).collect());
        if *i >= alive.len() {
            return false;
        }
        alive.remove(*i);
        return remove(tree, &target[..=at]);
    }
    let Some(section) = target.first() else {
        return false;
    };
    let section = vec![section.clone()];
    if silenced.contains(&section) {
        return false;
    }
    silenced.push(section.clone());
    let empty = Value::new(None, ValueKind::Table(Default::default()));
    remove(tree, &section);
    insert(tree, &section, empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Root {
        a: A,
        #[serde(default)]
        list: Vec<Entry>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct A {
        name: String,
        #[serde(default)]
        count: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Entry {
        id: u32,
    }

    fn tree(toml: &str) -> Value {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn every_problem_is_found_once_with_the_index_the_user_wrote() {
        let shaped = read::<Root>(tree(
            "[a]\ncount = \"many\"\ncolour = 1\n[[list]]\nid = \"x\"\n[[list]]\nid = 2\n[[list]]\n[[list]]\nid = \"y\"\n",
        ));
        assert_eq!(
            shaped.problems,
            [
                "a.colour: unknown key, expected `name` or `count`",
                "a.count: invalid type: string \"many\", expected an integer",
                "a.name: missing; this key is required",
                "list[0].id: invalid type: string \"x\", expected an integer",
                "list[2].id: missing; this key is required",
                "list[3].id: invalid type: string \"y\", expected an integer",
            ]
        );
        // Read on from a patched tree, which says where validation would only echo these.
        let patched = shaped.value.unwrap();
        assert_eq!(
            (patched.a.name.as_str(), patched.a.count, patched.list.len()),
            ("", 0, 1)
        );
        for key in ["a.name", "a.count", "list"] {
            assert!(
                shaped.set_aside.iter().any(|k| k == key),
                "{key}: {:?}",
                shaped.set_aside
            );
        }
    }

    #[test]
    fn a_good_tree_reads_without_problems() {
        let shaped = read::<Root>(tree("[a]\nname = \"n\"\n[[list]]\nid = 1\n"));
        assert!(shaped.problems.is_empty());
        assert_eq!(shaped.value.unwrap().list[0].id, 1);
    }
}
