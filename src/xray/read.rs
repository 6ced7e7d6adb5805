//! One config file as the JSON value Xray builds from it: JSON with comments, TOML or YAML.
//!
//! Xray turns TOML and YAML into JSON before it decodes them, so one model serves all three.

use serde_json::Value;

/// A config file's format, chosen the way Xray chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
    Yaml,
}

impl Format {
    /// From `-format` when given, else from the file's extension. Xray refuses to start on an
    /// extension it does not know, so a running runtime with one was given JSON (V2Ray reads
    /// every file as JSON).
    pub fn choose(format_flag: Option<&str>, path: &str) -> Format {
        let by_name = |s: &str| match s.to_ascii_lowercase().as_str() {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            "json" | "jsonc" => Some(Format::Json),
            _ => None,
        };
        if let Some(f) = format_flag.and_then(by_name) {
            return f;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        name.rsplit_once('.')
            .and_then(|(_, ext)| by_name(ext))
            .unwrap_or(Format::Json)
    }
}

/// Parses one file's text; the error is one line that says where the text is wrong.
pub fn parse(text: &str, format: Format) -> Result<Value, String> {
    let value = match format {
        Format::Json => serde_json::from_str(&strip_comments(text)).map_err(|e| e.to_string())?,
        Format::Toml => toml::from_str::<Value>(text).map_err(|e| one_line(&e.to_string()))?,
        Format::Yaml => yaml(text)?,
    };
    if !value.is_object() {
        return Err("the top level is not an object".into());
    }
    Ok(value)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Removes `//`, `/* */` and `#` comments outside strings, as Xray's JSON reader does; newlines
/// are kept, so error positions still point at the right line.
pub fn strip_comments(text: &str) -> String {
    #[derive(PartialEq)]
    enum S {
        Content,
        Str(char),
        StrEscape(char),
        Line,
        Block,
        BlockStar,
    }
    let mut out = String::with_capacity(text.len());
    let mut state = S::Content;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        state = match state {
            S::Content => match c {
                '"' | '\'' => {
                    out.push(c);
                    S::Str(c)
                }
                '#' => S::Line,
                '/' if chars.peek() == Some(&'/') => {
                    chars.next();
                    S::Line
                }
                '/' if chars.peek() == Some(&'*') => {
                    chars.next();
                    S::Block
                }
                _ => {
                    out.push(c);
                    S::Content
                }
            },
            S::Str(q) => {
                out.push(c);
                match c {
                    '\\' => S::StrEscape(q),
                    _ if c == q => S::Content,
                    _ => S::Str(q),
                }
            }
            S::StrEscape(q) => {
                out.push(c);
                S::Str(q)
            }
            S::Line if c == '\n' => {
                out.push('\n');
                S::Content
            }
            S::Line => S::Line,
            S::Block | S::BlockStar => {
                if c == '\n' {
                    out.push('\n');
                }
                match c {
                    '/' if state == S::BlockStar => S::Content,
                    '*' => S::BlockStar,
                    _ => S::Block,
                }
            }
        };
    }
    out
}

fn yaml(text: &str) -> Result<Value, String> {
    use yaml_rust2::YamlLoader;
    let docs = YamlLoader::load_from_str(text).map_err(|e| one_line(&e.to_string()))?;
    match docs.len() {
        0 => Err("the file is empty".into()),
        1 => yaml_to_json(&docs[0]),
        n => Err(format!("the file holds {n} YAML documents; Xray reads one")),
    }
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> Result<Value, String> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{r} is not a number JSON can hold"))?,
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = serde_json::Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("a mapping key {other:?} is not a string")),
                };
                m.insert(key, yaml_to_json(v)?);
            }
            Value::Object(m)
        }
        Yaml::Alias(_) | Yaml::BadValue => {
            return Err("the YAML holds an unresolvable value".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn comments_are_removed_outside_strings_only() {
        let text =
            "// head\n{\"a\": \"x//y#z/*w*/\", # hash\n \"b\": /* block\n more */ 2, 'q#': 1}";
        let stripped = strip_comments(text);
        assert_eq!(
            stripped,
            "\n{\"a\": \"x//y#z/*w*/\", \n \"b\": \n 2, 'q#': 1}"
        );
        let ok = "{\"a\": \"say \\\"//hi\\\"\", /* **/ \"b\": 1 // end";
        assert_eq!(
            parse(&format!("{ok}\n}}"), Format::Json).unwrap(),
            json!({"a": "say \"//hi\"", "b": 1})
        );
        // A lone slash is content (and then bad JSON, as in Xray).
        assert_eq!(strip_comments("{\"a\": 1/2}"), "{\"a\": 1/2}");
    }

    #[test]
    fn format_by_flag_then_extension() {
        assert_eq!(Format::choose(None, "/etc/xray/c.yml"), Format::Yaml);
        assert_eq!(Format::choose(None, "/etc/xray/c.YAML"), Format::Yaml);
        assert_eq!(Format::choose(None, "c.toml"), Format::Toml);
        assert_eq!(Format::choose(None, "c.jsonc"), Format::Json);
        assert_eq!(Format::choose(None, "/etc/x.d/config"), Format::Json);
        assert_eq!(Format::choose(Some("yaml"), "c.json"), Format::Yaml);
        assert_eq!(Format::choose(Some("nonsense"), "c.toml"), Format::Toml);
    }

    #[test]
    fn toml_and_yaml_become_the_same_value() {
        let want = json!({"inbounds": [{"tag": "in", "port": 443, "listen": "0.0.0.0"}]});
        let toml = "[[inbounds]]\ntag = \"in\"\nport = 443\nlisten = \"0.0.0.0\"\n";
        assert_eq!(parse(toml, Format::Toml).unwrap(), want);
        let yaml = "inbounds:\n  - tag: in\n    port: 443\n    listen: 0.0.0.0\n";
        assert_eq!(parse(yaml, Format::Yaml).unwrap(), want);
        // JSON is YAML too.
        assert_eq!(parse(&want.to_string(), Format::Yaml).unwrap(), want);
    }

    #[test]
    fn bad_files_give_one_line_errors() {
        for (text, format) in [
            ("{\"a\": ", Format::Json),
            ("[1, 2]", Format::Json),
            ("a = ", Format::Toml),
            ("a: [", Format::Yaml),
            ("", Format::Yaml),
            ("a: 1\n---\nb: 2\n", Format::Yaml),
            ("- 1\n", Format::Yaml),
        ] {
            let e = parse(text, format).unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{text:?}: {e:?}");
        }
    }
}
