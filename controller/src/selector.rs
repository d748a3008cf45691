//! Label selectors, kubectl syntax: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        parse_requirements(text)
            .map(Selector)
            .map_err(|reason| SelectorError {
                selector: text.to_string(),
                reason: reason.to_string(),
            })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
            Requirement::NotIn(k, set) => labels.get(k).is_none_or(|v| !set.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

fn parse_requirements(text: &str) -> Result<Vec<Requirement>, &'static str> {
    let mut requirements = Vec::new();
    for term in split_terms(text)? {
        let term = term.trim();
        if term.is_empty() {
            return Err("empty requirement");
        }
        let requirement = if let Some(key) = term.strip_prefix('!') {
            Requirement::DoesNotExist(key_of(key)?)
        } else if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(key_of(k)?, value_of(v)?)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(key_of(k)?, value_of(v)?)
        } else if let Some((k, set)) = term.split_once(" notin ") {
            Requirement::NotIn(key_of(k)?, set_of(set)?)
        } else if let Some((k, set)) = term.split_once(" in ") {
            Requirement::In(key_of(k)?, set_of(set)?)
        } else {
            Requirement::Exists(key_of(term)?)
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

fn key_of(k: &str) -> Result<String, &'static str> {
    let k = k.trim();
    if k.is_empty() || k.contains(|c: char| c.is_whitespace() || "(),!=".contains(c)) {
        Err("bad key")
    } else {
        Ok(k.to_string())
    }
}

fn value_of(v: &str) -> Result<String, &'static str> {
    let v = v.trim();
    if v.contains(|c: char| c.is_whitespace() || "(),!=".contains(c)) {
        Err("bad value")
    } else {
        Ok(v.to_string())
    }
}

fn set_of(set: &str) -> Result<Vec<String>, &'static str> {
    let inner = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or("a set must be in parentheses")?;
    inner.split(',').map(value_of).collect()
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, &'static str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced parentheses");
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    if !text.trim().is_empty() {
        terms.push(&text[start..]);
    }
    Ok(terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_selects_what_kubectl_would() {
        let edge = labels(&[("tier", "edge"), ("site", "calar-alto")]);
        let cloud = labels(&[("tier", "cloud")]);
        let cases = [
            ("tier=edge", true, false),
            ("tier==edge", true, false),
            ("tier!=edge", false, true),
            ("tier in (edge, hpc)", true, false),
            ("tier notin (edge,hpc)", false, true),
            ("site", true, false),
            ("!site", false, true),
            ("tier in (edge,cloud),!site", false, true),
            ("", true, true),
        ];
        for (text, on_edge, on_cloud) in cases {
            let s = Selector::parse(text).unwrap();
            assert_eq!(s.matches(&edge), on_edge, "{text} on edge");
            assert_eq!(s.matches(&cloud), on_cloud, "{text} on cloud");
        }
    }

    #[test]
    fn malformed_selectors_are_errors() {
        for bad in ["tier in edge", "a=(b", "=x", "tier in (a,b", ",", "a b"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }
}
