//! A minimal netrc reader for upstream credentials (`machine`, `login`, `password`, `default`).

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Netrc {
    machines: Vec<(Option<String>, String, String)>,
}

impl Netrc {
    /// Parses netrc text. Tokens are whitespace-separated; `macdef` blocks are skipped.
    pub fn parse(text: &str) -> Netrc {
        let mut machines = Vec::new();
        let mut tokens = text.split_whitespace().peekable();
        let mut current: Option<(Option<String>, String, String)> = None;
        while let Some(tok) = tokens.next() {
            match tok {
                "machine" | "default" => {
                    if let Some(m) = current.take() {
                        machines.push(m);
                    }
                    let host = if tok == "machine" {
                        tokens.next().map(String::from)
                    } else {
                        None
                    };
                    current = Some((host, String::new(), String::new()));
                }
                "login" => {
                    if let (Some(m), Some(v)) = (current.as_mut(), tokens.next()) {
                        m.1 = v.to_string();
                    }
                }
                "password" => {
                    if let (Some(m), Some(v)) = (current.as_mut(), tokens.next()) {
                        m.2 = v.to_string();
                    }
                }
                "account" | "macdef" => {
                    tokens.next();
                }
                _ => {}
            }
        }
        if let Some(m) = current {
            machines.push(m);
        }
        Netrc { machines }
    }

    /// Login and password for `host`: its `machine` entry, else the `default` entry.
    pub fn credentials(&self, host: &str) -> Option<(&str, &str)> {
        self.machines
            .iter()
            .find(|m| m.0.as_deref() == Some(host))
            .or_else(|| self.machines.iter().find(|m| m.0.is_none()))
            .map(|m| (m.1.as_str(), m.2.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_then_default() {
        let n = Netrc::parse("machine a.example login u password p\ndefault login d password q\n");
        assert_eq!(n.credentials("a.example"), Some(("u", "p")));
        assert_eq!(n.credentials("b.example"), Some(("d", "q")));
        assert_eq!(Netrc::parse("").credentials("x"), None);
    }
}
