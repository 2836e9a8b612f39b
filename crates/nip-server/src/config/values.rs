//! The value of every setting: each parsed as its [`Kind`] says, with its declared default
//! applied. [`ServeConfig`](super::ServeConfig) is built from it and `--print-config` shows it, so
//! a new setting needs no parsing or printing code of its own.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use nip_core::redact::redact_userinfo;
use nip_core::signing::PublicKey;
use serde_json::{json, Map, Value as Json};

use super::{
    err, parse_bool, parse_cidr, parse_duration, parse_size, parse_upstream, ConfigError,
    UpstreamConfig, DEFAULT_DB_CONNECTIONS,
};
use crate::settings::{find, Fallback, Kind, Layer, Setting, SETTINGS};

/// A parsed setting value; which variant follows from the setting's [`Kind`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Text(String),
    Path(PathBuf),
    Duration(Duration),
    Number(f64),
    Int(u64),
    Upstreams(Vec<UpstreamConfig>),
    Keys(Vec<PublicKey>),
    Cidrs(Vec<ipnet::IpNet>),
}

/// Settings that `--print-config` shows as one table under their common prefix (`null` when the
/// first setting, the switch, has no value): S3 storage.
const TABLES: &[(&str, &str)] = &[("cache.storage.s3", "cache.storage.s3.bucket")];

/// The implemented settings' values by key: those given, and the defaults of the others.
#[derive(Clone, Debug, Default)]
pub struct Values {
    values: BTreeMap<&'static str, Value>,
    /// The settings a layer gave (rather than their default).
    given: BTreeSet<&'static str>,
}

impl Values {
    /// Parses every implemented setting of the merged layer in table order, falling back to its
    /// default. A setting whose `requires` has no value is not read. Errors name the setting.
    pub fn resolve(layer: &Layer) -> Result<Values, ConfigError> {
        let mut values = Values::default();
        for s in SETTINGS.iter().filter(|s| s.not_implemented.is_none()) {
            if s.requires.is_some_and(|key| !values.is_set(key)) {
                continue;
            }
            let raw = match given(s, layer) {
                Some(raw) => {
                    values.given.insert(s.key);
                    raw
                }
                None => match fallback(s, &values) {
                    Some(raw) => raw,
                    None => continue,
                },
            };
            let value = parse(s, &raw).map_err(|message| err(s.key, message))?;
            values.values.insert(s.key, value);
        }
        Ok(values)
    }

    /// The value of `key` (declared in the table) as `T`; `None` when it has none.
    ///
    /// Panics when `key` is no setting or `T` is not the type its kind gives: a programming error.
    pub fn get<T: FromValue>(&self, key: &str) -> Option<T> {
        assert!(find(key).is_some(), "no setting {key}");
        let value = self.values.get(key)?;
        Some(
            T::from_value(value)
                .unwrap_or_else(|| panic!("setting {key} is not a {}", std::any::type_name::<T>())),
        )
    }

    /// The value of a setting that always has one: it has a default (and where a derived default
    /// may be missing, the config's validation checks it is there).
    pub fn req<T: FromValue>(&self, key: &str) -> T {
        self.get(key)
            .unwrap_or_else(|| panic!("setting {key} has no value"))
    }

    /// A list setting's values (empty when none).
    pub fn list<T>(&self, key: &str) -> Vec<T>
    where
        Vec<T>: FromValue,
    {
        self.get(key).unwrap_or_default()
    }

    /// A boolean setting (false when unset).
    pub fn flag(&self, key: &str) -> bool {
        self.get(key).unwrap_or(false)
    }

    pub fn is_set(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// Whether a layer gave the setting (rather than its default).
    pub fn given(&self, key: &str) -> bool {
        self.given.contains(key)
    }

    /// Drops a value that has no effect, so it is not shown as if it had.
    pub fn unset(&mut self, key: &str) {
        self.values.remove(key);
    }

    /// What `--print-config` shows: every implemented setting under its key, secrets masked and
    /// URLs without credentials, `null` (an empty list) when unset; S3 storage as one table, and
    /// the rate limit as one `"<rps>/s burst <burst>"` entry.
    pub fn to_json(&self) -> Map<String, Json> {
        let mut out = Map::new();
        for s in SETTINGS
            .iter()
            .filter(|s| s.not_implemented.is_none() && !s.key.starts_with("rate-limit."))
        {
            let shown = match self.values.get(s.key) {
                Some(value) => show(s, value),
                None if s.multi => json!([]),
                None => Json::Null,
            };
            let table = TABLES
                .iter()
                .find(|(t, _)| s.key.strip_prefix(t).is_some_and(|r| r.starts_with('.')));
            match table {
                Some((table, switch)) if self.is_set(switch) => {
                    let entry = out.entry(*table).or_insert_with(|| json!({}));
                    if let Json::Object(fields) = entry {
                        fields.insert(s.key[table.len() + 1..].to_string(), shown);
                    }
                }
                Some((table, _)) => {
                    out.insert(table.to_string(), Json::Null);
                }
                None => {
                    out.insert(s.key.to_string(), shown);
                }
            }
        }
        let rate = self.get::<f64>("rate-limit.rps");
        let rate = rate.map(|rps| format!("{rps}/s burst {}", self.req::<f64>("rate-limit.burst")));
        out.insert("rate-limit".into(), json!(rate));
        out
    }
}

/// The values `layer` gives `s`, or `None` (also for an empty value where that means unset).
fn given(s: &Setting, layer: &Layer) -> Option<Vec<String>> {
    let raw = layer.get(s.key)?;
    let raw: Vec<String> = if s.split_commas {
        raw.iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect()
    } else if s.multi {
        raw.clone()
    } else {
        raw.last().cloned().into_iter().collect()
    };
    let unset = match raw.first() {
        None => true,
        Some(v) if s.empty_unset && matches!(s.kind, Kind::Cron | Kind::Url(_)) => {
            v.trim().is_empty()
        }
        Some(v) => s.empty_unset && v.is_empty(),
    };
    (!unset).then_some(raw)
}

/// The default of `s`, as a user would write it; derived ones from the values before it.
fn fallback(s: &Setting, values: &Values) -> Option<Vec<String>> {
    match s.default {
        Fallback::Unset | Fallback::Off(_) => None,
        Fallback::Value(v) => Some(vec![v.to_string()]),
        Fallback::Derived(_, derive) => derive(values).map(|v| vec![v]),
    }
}

/// Parses the raw values of `s` (at least one) as its kind says.
fn parse(s: &Setting, raw: &[String]) -> Result<Value, String> {
    match s.kind {
        Kind::Upstreams => raw
            .iter()
            .map(|u| parse_upstream(u))
            .collect::<Result<_, _>>()
            .map(Value::Upstreams),
        Kind::PublicKeys => raw
            .iter()
            .map(|k| {
                PublicKey::parse(k)
                    .map_err(|e| format!("{k:?} is not a name:base64 public key: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Value::Keys),
        Kind::Cidrs => raw
            .iter()
            .map(|v| {
                parse_cidr(v).ok_or_else(|| {
                    format!("{v:?} is not an address or CIDR range (e.g. 10.0.0.0/8)")
                })
            })
            .collect::<Result<_, _>>()
            .map(Value::Cidrs),
        Kind::Words => Ok(Value::Text(raw.join(","))),
        kind => parse_scalar(s, kind, raw.last().map_or("", String::as_str)),
    }
}

fn parse_scalar(s: &Setting, kind: Kind, v: &str) -> Result<Value, String> {
    let text = || Value::Text(v.to_string());
    let duration = |like: &str, nonzero: bool| {
        parse_duration(v)
            .filter(|d| !(nonzero && d.is_zero()))
            .map(Value::Duration)
            .ok_or_else(|| format!("expected a duration like {like}, got {v:?}"))
    };
    let number = |ok: fn(f64) -> bool, expected: &str| {
        v.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && ok(*n))
            .map(Value::Number)
            .ok_or_else(|| format!("expected {expected}, got {v:?}"))
    };
    match kind {
        Kind::Bool => parse_bool(v).map(Value::Bool),
        Kind::Text => Ok(text()),
        Kind::Path => Ok(Value::Path(PathBuf::from(v))),
        Kind::Choice(words) if words.contains(&v) => Ok(text()),
        Kind::Choice(words) => Err(format!("expected {}, got {v:?}", words.join(" or "))),
        Kind::HostName if v.is_empty() || v.contains([':', ' ', '/']) => {
            Err(format!("{v:?} is not a host name"))
        }
        Kind::HostName => Ok(text()),
        Kind::Url(_) if v.starts_with("http://") || v.starts_with("https://") => Ok(text()),
        Kind::Url(example) => Err(format!(
            "{:?} must be a URL with http:// or https://{}",
            redact_userinfo(v),
            example.map(|e| format!(", e.g. {e}")).unwrap_or_default()
        )),
        Kind::DatabaseUrl if nip_store::Backend::of_url(v).is_ok() => Ok(text()),
        Kind::DatabaseUrl => Err(format!(
            "{:?}: use sqlite:PATH (e.g. sqlite:/var/lib/nip/db.sqlite), postgres://USER@HOST/DB or mysql://USER:PASSWORD@HOST/DB",
            redact_userinfo(v)
        )),
        Kind::Duration => duration("3s or 5m", false),
        Kind::PositiveDuration => duration("30s", true),
        Kind::Age => duration("30d", true),
        Kind::Size => parse_size(v)
            .filter(|n| *n > 0)
            .map(Value::Int)
            .ok_or_else(|| format!("expected a size like 10G, got {v:?}")),
        Kind::SizeOrZero => parse_size(v)
            .map(Value::Int)
            .ok_or_else(|| format!("expected a size like 1M, or 0, got {v:?}")),
        Kind::Rate => number(|n| n > 0.0, "a positive number"),
        Kind::Burst => number(|n| n >= 1.0, "a number >= 1"),
        Kind::Count => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Value::Int(n as u64))
            .ok_or_else(|| format!("expected a positive number, got {v:?}")),
        Kind::PoolSize => match v.trim().parse::<u32>() {
            // 0 means "the default" in ncps.
            Ok(0) => Ok(Value::Int(DEFAULT_DB_CONNECTIONS.into())),
            Ok(n) => Ok(Value::Int(n.into())),
            Err(_) => Err(format!("expected a number of connections, got {v:?}")),
        },
        Kind::Cron => match super::Schedule::parse(v) {
            Ok(_) => Ok(text()),
            Err(e) => Err(format!(
                "{e} (e.g. \"0 2 * * *\", \"@daily\", \"@every 1h\", \"CRON_TZ=Europe/Paris 0 2 * * *\")"
            )),
        },
        Kind::TimeZone => super::Zone::parse(v).map(|_| text()),
        Kind::Upstreams | Kind::PublicKeys | Kind::Cidrs | Kind::Words => {
            unreachable!("{}: lists are parsed by parse", s.key)
        }
    }
}

/// How `--print-config` shows a value.
fn show(s: &Setting, value: &Value) -> Json {
    if s.secret {
        return json!("***");
    }
    match (s.kind, value) {
        (Kind::Url(_) | Kind::DatabaseUrl, Value::Text(url)) => json!(redact_userinfo(url)),
        (Kind::Age, Value::Duration(d)) => json!(format!("{}s", d.as_secs())),
        (_, Value::Duration(d)) => json!(format!("{}ms", d.as_millis())),
        (_, Value::Bool(b)) => json!(b),
        (_, Value::Text(t)) => json!(t),
        (_, Value::Path(p)) => json!(p.display().to_string()),
        (_, Value::Number(n)) => json!(n),
        (_, Value::Int(n)) => json!(n),
        (_, Value::Upstreams(upstreams)) => json!(upstreams
            .iter()
            .map(|u| {
                let url = redact_userinfo(&u.url);
                let mut query = Vec::new();
                if let Some(p) = u.priority {
                    query.push(format!("priority={p}"));
                }
                if u.trusted {
                    query.push("trusted=1".to_string());
                }
                match query.is_empty() {
                    true => url,
                    false => format!("{url}?{}", query.join("&")),
                }
            })
            .collect::<Vec<_>>()),
        (_, Value::Keys(keys)) => json!(keys.iter().map(|k| k.to_string()).collect::<Vec<_>>()),
        (_, Value::Cidrs(nets)) => json!(nets.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
    }
}

/// The Rust types setting values convert to (see [`Values::get`]).
pub trait FromValue: Sized {
    fn from_value(value: &Value) -> Option<Self>;
}

macro_rules! from_value {
    ($($t:ty: $pattern:pat => $e:expr;)*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value) -> Option<Self> {
                match value {
                    $pattern => $e,
                    _ => None,
                }
            }
        }
    )*};
}

from_value! {
    bool: Value::Bool(b) => Some(*b);
    String: Value::Text(t) => Some(t.clone());
    PathBuf: Value::Path(p) => Some(p.clone());
    Duration: Value::Duration(d) => Some(*d);
    f64: Value::Number(n) => Some(*n);
    u64: Value::Int(n) => Some(*n);
    u32: Value::Int(n) => u32::try_from(*n).ok();
    usize: Value::Int(n) => usize::try_from(*n).ok();
    Vec<UpstreamConfig>: Value::Upstreams(u) => Some(u.clone());
    Vec<PublicKey>: Value::Keys(k) => Some(k.clone());
    Vec<ipnet::IpNet>: Value::Cidrs(c) => Some(c.clone());
}
