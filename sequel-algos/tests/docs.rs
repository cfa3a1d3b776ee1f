//! The documentation that lists algorithms is checked against the registry, so a new algorithm
//! (one file + one registry line) cannot be left out of it, nor a key or default go stale:
//! docs/config.md (a section per algorithm with every YAML key and its default), the `sequel list`
//! output in docs/user-guide.md, and the algorithm list of README.md.

use std::path::Path;

use sequel_algos::Registry;
use serde_yaml::Value;

fn doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `### ` section of config.md whose title names `` `name` ``.
fn section<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let tag = format!("`{name}`");
    let start = text
        .match_indices("\n### ")
        .map(|(i, _)| i + 1)
        .find(|&i| text[i..].lines().next().is_some_and(|l| l.contains(&tag)))?;
    let end = text[start + 4..]
        .find("\n## ")
        .into_iter()
        .chain(text[start + 4..].find("\n### "))
        .min()
        .map_or(text.len(), |e| start + 4 + e);
    Some(&text[start..end])
}

/// The default written in a `| `key` | `default` | … |` row, if the row names only `key`.
fn documented_default(section: &str, key: &str) -> Option<Value> {
    let row = section
        .lines()
        .find(|l| l.starts_with(&format!("| `{key}` |")))?;
    let cell = row.split('|').nth(2)?.trim();
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    serde_yaml::from_str(inner).ok()
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(1.0),
        _ => a == b,
    }
}

#[test]
fn config_md_documents_every_registered_algorithm_key_and_default() {
    let reg = Registry::builtin();
    let text = doc("docs/config.md");
    let mut checked_defaults = 0;
    for (name, _) in reg.algorithms() {
        assert!(
            text.contains(&format!("| `{name}`")) || text.contains(&format!(", `{name}` |")),
            "docs/config.md: `{name}` missing from the table of algorithms"
        );
        let Value::Mapping(defaults) = reg.algorithm_defaults(name).unwrap() else {
            panic!("{name}: defaults are not a mapping");
        };
        let keys: Vec<&str> = defaults
            .keys()
            .filter_map(Value::as_str)
            .filter(|k| *k != "name")
            .collect();
        if keys.is_empty() {
            continue;
        }
        let s = section(&text, name)
            .unwrap_or_else(|| panic!("docs/config.md: no `### ` section for `{name}`"));
        for key in keys {
            assert!(
                s.contains(&format!("`{key}`")),
                "docs/config.md, section of `{name}`: key `{key}` is not documented"
            );
            // A nested block (EWC's `fisher`, MAS's `importance`) documents each of its keys as
            // `key.sub`, with the sub-key's own default.
            if let Some(Value::Mapping(nested)) = defaults.get(key) {
                for (sub, code_default) in nested {
                    let sub = format!("{key}.{}", sub.as_str().unwrap());
                    assert!(
                        s.contains(&format!("`{sub}`")),
                        "docs/config.md, section of `{name}`: key `{sub}` is not documented"
                    );
                    if let Some(doc_default) = documented_default(s, &sub) {
                        assert!(
                            same(&doc_default, code_default),
                            "docs/config.md, `{name}.{sub}`: documented default {doc_default:?}, code {code_default:?}"
                        );
                        checked_defaults += 1;
                    }
                }
            }
            let (Some(doc_default), Some(code_default)) =
                (documented_default(s, key), defaults.get(key))
            else {
                continue;
            };
            assert!(
                same(&doc_default, code_default),
                "docs/config.md, `{name}.{key}`: documented default {doc_default:?}, code {code_default:?}"
            );
            checked_defaults += 1;
        }
    }
    // The check must bite: most keys have a plain default cell.
    assert!(checked_defaults > 30, "{checked_defaults}");
}

#[test]
fn the_sequel_list_output_and_readme_name_every_algorithm() {
    let reg = Registry::builtin();
    let guide = doc("docs/user-guide.md");
    let readme = doc("README.md");
    for (name, summary) in reg.algorithms() {
        let line = format!("  {name:<16} {summary}");
        assert!(
            guide.contains(&line),
            "docs/user-guide.md: the `sequel list` output lacks\n{line}"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md: algorithm `{name}` missing from the layout list"
        );
    }
}

#[test]
fn the_section_finder_finds_what_the_checks_rely_on() {
    let text = "## a\n### `x` — t\n| `k` | `0.5` | m |\n### `y` and `z`\nbody\n## b\n";
    let s = section(text, "x").unwrap();
    assert!(s.contains("`k`") && !s.contains("body"));
    assert_eq!(documented_default(s, "k"), Some(Value::from(0.5)));
    assert!(section(text, "z").unwrap().contains("body"));
    assert!(section(text, "w").is_none());
}

/// Every key of `model:` (the optional ones set, so that they are serialised) has a row in
/// config.md's `## model` table, and `model.dwa`'s keys a row in its `### model.dwa` section.
#[test]
fn config_md_documents_every_model_key() {
    use sequel_core::config::{ActivationKind, DwaConfig, LoraConfig, ModelConfig};
    let text = doc("docs/config.md");
    let start = text
        .find("\n## model\n")
        .expect("docs/config.md: no `## model` section");
    let end = text[start + 1..]
        .find("\n## ")
        .map_or(text.len(), |e| start + 1 + e);
    let table = &text[start..end];
    let m = ModelConfig {
        activation: ActivationKind::CenteredSoftplus,
        softplus_beta: Some(5.0),
        learn_beta: true,
        dwa: Some(DwaConfig::default()),
        lora: Some(LoraConfig {
            freeze_backbone_after: Some(1),
            ..LoraConfig::default()
        }),
        lipschitz_bn: true,
        init_from: Some("x".into()),
        freeze: vec!["fc1".into()],
        ..ModelConfig::default()
    };
    let v = serde_yaml::to_value(&m).unwrap();
    for (key, _) in v.as_mapping().unwrap() {
        let key = key.as_str().unwrap();
        assert!(
            table.contains(&format!("| `{key}` |")),
            "docs/config.md, `## model`: key `{key}` is not documented"
        );
    }
    assert!(table.contains("centered-softplus"));
    let lora = LoraConfig {
        freeze_backbone_after: Some(1),
        ..LoraConfig::default()
    };
    for (name, value, defaults) in [
        (
            "model.dwa",
            serde_yaml::to_value(DwaConfig::default()).unwrap(),
            serde_yaml::to_value(DwaConfig::default()).unwrap(),
        ),
        (
            "model.lora",
            serde_yaml::to_value(lora).unwrap(),
            serde_yaml::to_value(LoraConfig::default()).unwrap(),
        ),
    ] {
        let sec = section(&text, name)
            .unwrap_or_else(|| panic!("docs/config.md: no `### {name}` section"));
        for (key, _) in value.as_mapping().unwrap() {
            let key = key.as_str().unwrap();
            // | Key | Type | Default | Allowed values | Meaning |
            let row = sec
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("docs/config.md, {name}: key `{key}` not documented"));
            // Keys absent by default are documented as such; the others with their value.
            let Some(default) = defaults.get(key) else {
                assert!(row.contains("absent"), "{name}.{key}: say it is absent");
                continue;
            };
            let cell = row.split('|').nth(3).unwrap().trim().trim_matches('`');
            let doc_default: Value = serde_yaml::from_str(cell).unwrap();
            assert!(
                same(&doc_default, default),
                "{name}.{key}: {doc_default:?} vs {default:?}"
            );
        }
    }
}
