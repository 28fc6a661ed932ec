//! Reading JSON for the spec: objects whose keys must be unique, fields
//! taken by name (what is left is unknown), and values checked by kind, each
//! error saying what was found instead.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON value whose objects each have every key once: serde_json would keep
/// the last of two equal keys silently, and a second node of the same name
/// would replace the first unseen. The only data error it raises is a
/// duplicate key (the rest are syntax errors).
pub(super) struct UniqueKeys(pub(super) Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(Value::Null))
    }

    fn visit_bool<E>(self, b: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(b.into()))
    }

    fn visit_i64<E>(self, n: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(n.into()))
    }

    fn visit_str<E>(self, s: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(s.into()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(UniqueKeys(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("key {key:?} is given twice in one object")));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(UniqueKeys(Value::Object(object)))
    }
}

/// Takes known keys out of a JSON object; whatever is left is an unknown key.
pub(super) struct Fields<'a> {
    map: &'a Map<String, Value>,
    taken: BTreeSet<&'static str>,
    /// `node "x": ` or empty at top level.
    place: String,
}

impl<'a> Fields<'a> {
    pub(super) fn new(map: &'a Map<String, Value>, place: String) -> Self {
        Fields { map, taken: BTreeSet::new(), place }
    }

    pub(super) fn take(&mut self, key: &'static str) -> Option<&'a Value> {
        self.taken.insert(key);
        self.map.get(key)
    }

    pub(super) fn finish(self) -> Result<()> {
        match self.map.keys().find(|k| !self.taken.contains(k.as_str())) {
            None => Ok(()),
            Some(k) => {
                let known: Vec<&str> = self.taken.iter().copied().collect();
                bail!("{}unknown field {k:?} (known: {})", self.place, known.join(", "))
            }
        }
    }
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(super) fn list(v: &Value) -> Result<&Vec<Value>> {
    v.as_array().ok_or_else(|| anyhow!("expected a list, not {}", kind(v)))
}

pub(super) fn string(v: &Value) -> Result<String> {
    let s = v.as_str().ok_or_else(|| anyhow!("expected a string, not {}", kind(v)))?;
    // Every string ends up in a run script or an argument of QEMU, and
    // neither can carry a NUL: a shell would cut or drop it.
    if s.contains('\0') {
        bail!("contains a NUL byte, which no script or command line can carry");
    }
    Ok(s.to_owned())
}

pub(super) fn int_in(v: &Value, lo: u32, hi: u32) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| anyhow!("{n} is not a whole number"))?,
        other => bail!("expected a whole number, not {}", kind(other)),
    };
    if n < i64::from(lo) || n > i64::from(hi) {
        bail!("{n} is out of range {lo}..={hi}");
    }
    Ok(n as u32)
}

pub(super) fn path(v: &Value, base: &Path) -> Result<PathBuf> {
    let s = string(v)?;
    if s.is_empty() {
        bail!("empty path");
    }
    Ok(base.join(s))
}
