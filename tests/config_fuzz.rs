//! No input makes the config reader panic: arbitrary text in each format, and arbitrary JSON
//! shaped like an Xray config (the right keys with values of any type), go through parsing,
//! the model, the merge and every verdict, and come out as a value or an error.

use proptest::prelude::*;
use raylimit::xray::config::{self, FileConfig};
use raylimit::xray::locate::{Located, Origin};
use raylimit::xray::read::{self, Format};
use raylimit::xray::{verdict, FileRead, FileStatus, Loaded};
use serde_json::{json, Map, Value};

fn env(name: &str) -> Option<String> {
    (name == "PORT").then(|| "443".to_string())
}

/// Runs every reader stage over the values; panics are the only failure.
fn exercise(values: &[Value]) {
    let mut parsed: Vec<FileConfig> = Vec::new();
    let mut files = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let path = format!("/etc/xray/{i}-tail.json");
        let status = match config::from_value(v, &path, &env) {
            Ok(f) => {
                parsed.push(f);
                FileStatus::Read
            }
            Err(e) => FileStatus::Invalid(e),
        };
        files.push(FileRead { path, status });
    }
    let cfg = Loaded {
        located: Located {
            origin: Origin::Flags,
            confdir: None,
            files: files.iter().map(|f| f.path.clone()).collect(),
            format: None,
        },
        files,
        merged: config::merge(parsed),
    };
    let _ = verdict::api(&cfg);
    let tags: Vec<String> = cfg
        .merged
        .inbounds
        .iter()
        .map(|i| i.tag.clone())
        .chain(cfg.merged.outbounds.iter().map(|o| o.tag.clone()))
        .chain(["missing".to_string()])
        .collect();
    for t in &tags {
        if let Ok(l) = verdict::inbound(&cfg, t) {
            let _ = l.describe();
        }
        if let Ok(m) = verdict::outbound(&cfg, t) {
            let _ = m.describe();
        }
    }
}

/// Any JSON value, a few levels deep.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        "[a-z0-9:.,\\-/@\\[\\] ]{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "env:PORT",
            "env:NOPE",
            "1-2",
            "80,443",
            "0",
            "tcp,udp",
            "raw",
            "kcp",
            "::",
            "unix:///x"
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Keys an Xray config uses, so the generator reaches the reader's branches.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "tag",
        "protocol",
        "listen",
        "port",
        "settings",
        "streamSettings",
        "network",
        "sockopt",
        "mark",
        "dialerProxy",
        "proxySettings",
        "clients",
        "users",
        "id",
        "email",
        "udp",
        "dsSettings",
        "path",
        "services",
        "inboundTag",
        "outboundTag",
        "rules",
    ])
    .prop_map(str::to_string)
}

/// A config-shaped object: top-level keys with arbitrary contents.
fn config_value() -> impl Strategy<Value = Value> {
    let item = || {
        prop::collection::vec((key(), any_value()), 0..6)
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
    };
    (
        prop::collection::vec(item(), 0..4),
        prop::collection::vec(item(), 0..4),
        any_value(),
        any_value(),
    )
        .prop_map(|(ins, outs, api, routing)| {
            json!({"inbounds": ins, "outbounds": outs, "api": api, "routing": {"rules": [routing]}})
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        for format in [Format::Json, Format::Toml, Format::Yaml] {
            if let Ok(v) = read::parse(&text, format) {
                exercise(&[v]);
            }
        }
        let _ = read::strip_comments(&text);
    }

    #[test]
    fn config_shaped_values_never_panic(values in prop::collection::vec(config_value(), 1..4)) {
        exercise(&values);
    }

    #[test]
    fn comment_stripping_keeps_line_count(text in "[\\n/*#\"'a-z\\\\ ]{0,200}") {
        let stripped = read::strip_comments(&text);
        prop_assert_eq!(stripped.matches('\n').count(), text.matches('\n').count());
    }
}
