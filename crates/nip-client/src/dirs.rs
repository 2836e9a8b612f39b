//! Where the client keeps things on disk, following the XDG base directories (with the usual
//! `~/.config`, `~/.cache`, `~/.local/share` fallbacks).
use std::path::PathBuf;

/// The directory roots the client uses; built once from the environment so tests and callers can
/// point a whole "machine" somewhere else.
#[derive(Clone, Debug)]
pub struct Dirs {
    /// `$XDG_CONFIG_HOME/nip`: `remote-cache.json`, `recipes/`.
    pub config: PathBuf,
    /// `$XDG_CACHE_HOME/nip`: `binary-cache/`, the operations record.
    pub cache: PathBuf,
    /// `$XDG_DATA_HOME/nip`: `pkgs/` (unpacked results).
    pub data: PathBuf,
}

impl Dirs {
    /// Reads `XDG_CONFIG_HOME`, `XDG_CACHE_HOME`, `XDG_DATA_HOME` and `HOME`.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var_os(k).map(PathBuf::from))
    }

    /// Same as [`Dirs::from_env`] with an injected environment (pure, for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<PathBuf>) -> Self {
        // An empty or relative XDG value must be ignored (XDG spec).
        let xdg = |var: &str, fallback: &str| {
            get(var)
                .filter(|p| p.is_absolute())
                .unwrap_or_else(|| {
                    get("HOME")
                        .unwrap_or_else(|| PathBuf::from("."))
                        .join(fallback)
                })
                .join("nip")
        };
        Dirs {
            config: xdg("XDG_CONFIG_HOME", ".config"),
            cache: xdg("XDG_CACHE_HOME", ".cache"),
            data: xdg("XDG_DATA_HOME", ".local/share"),
        }
    }

    pub fn remote_config_file(&self) -> PathBuf {
        self.config.join("remote-cache.json")
    }
    pub fn user_recipes(&self) -> PathBuf {
        self.config.join("recipes")
    }
    pub fn binary_cache(&self) -> PathBuf {
        self.cache.join("binary-cache")
    }
    pub fn record_file(&self) -> PathBuf {
        self.cache.join("operations.jsonl")
    }
    /// Servers recently found unreachable (see `unreachable`).
    pub fn unreachable_file(&self) -> PathBuf {
        self.cache.join("unreachable.json")
    }
    pub fn pkgs(&self) -> PathBuf {
        self.data.join("pkgs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdg_wins_and_home_is_the_fallback() {
        let d = Dirs::from_lookup(|k| match k {
            "HOME" => Some("/h".into()),
            "XDG_CACHE_HOME" => Some("/c".into()),
            "XDG_DATA_HOME" => Some("relative".into()),
            _ => None,
        });
        assert_eq!(d.config, PathBuf::from("/h/.config/nip"));
        assert_eq!(d.cache, PathBuf::from("/c/nip"));
        assert_eq!(d.data, PathBuf::from("/h/.local/share/nip"));
        assert_eq!(
            d.remote_config_file(),
            PathBuf::from("/h/.config/nip/remote-cache.json")
        );
    }
}
