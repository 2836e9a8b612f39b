//! Recipes: `<pkg>.toml` files found in `./recipes/`, `NIP_RECIPES_PATH` and
//! `$XDG_CONFIG_HOME/nip/recipes/`, their validation and variant selection.
use crate::error::{ClientError, Result};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A recipe file. Unknown keys are errors so a typo (`varaints`) is not silently ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Directory relative to the recipe file; its content is hashed into the cache key.
    #[serde(default)]
    pub source: Option<String>,
    /// The variant names `+name` may select.
    #[serde(default)]
    pub variants: Vec<String>,
    /// Shell command run with `sh -c` in a fresh copy of the source.
    pub build: String,
}

/// A parsed recipe with where it came from and its canonical text (what the cache key hashes).
#[derive(Clone, Debug)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    pub path: PathBuf,
    /// Sorted-key JSON of the whole file: formatting and comments do not change the key.
    pub canonical: String,
}

impl LoadedRecipe {
    /// The source directory, if the recipe has one.
    pub fn source_dir(&self) -> Option<PathBuf> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        self.recipe.source.as_ref().map(|s| base.join(s))
    }
}

/// The directories searched, in order.
pub fn search_dirs(cwd: &Path, recipes_path: Option<&str>, user_recipes: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![cwd.join("recipes")];
    dirs.extend(
        recipes_path
            .unwrap_or("")
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    );
    dirs.push(user_recipes.to_path_buf());
    dirs
}

/// Every recipe name available in `dirs`, sorted and deduplicated.
pub fn available(dirs: &[PathBuf]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml") {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    names.insert(stem.to_string());
                }
            }
        }
    }
    names.into_iter().collect()
}

/// Finds and parses `<pkg>.toml`; a missing recipe lists what exists.
pub fn find(pkg: &str, dirs: &[PathBuf]) -> Result<LoadedRecipe> {
    if !valid_name(pkg) {
        return Err(ClientError::Recipe(format!(
            "invalid package name {pkg:?}: use letters, digits, '.', '_' and '-'"
        )));
    }
    for d in dirs {
        let path = d.join(format!("{pkg}.toml"));
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ClientError::Recipe(format!("{}: {e}", path.display())))?;
            return parse(&path, &text);
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let have = available(dirs);
    Err(ClientError::NotFound(format!(
        "no recipe {pkg:?} (searched {}); available: {}. A recipe is a file {pkg}.toml in one of \
         those directories (./recipes first) with name, version and build, the shell command that \
         fills $OUT (see examples/recipes/hello.toml); `nip recipe new {pkg}` writes a commented \
         template to ./recipes/{pkg}.toml",
        searched.join(", "),
        if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        }
    )))
}

/// Parses and validates a recipe; errors name the file (and the line, for syntax errors).
pub fn parse(path: &Path, text: &str) -> Result<LoadedRecipe> {
    let err = |m: String| ClientError::Recipe(format!("{}: {m}", path.display()));
    let value: toml::Value = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    let recipe: Recipe = value
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    for (what, v) in [("name", &recipe.name), ("version", &recipe.version)] {
        if !valid_name(v) || v.len() > 100 {
            return Err(err(format!(
                "{what} {v:?}: use 1-100 letters, digits, '.', '_' and '-', starting with a letter or digit"
            )));
        }
    }
    for v in &recipe.variants {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err(format!(
                "variant {v:?}: use letters, digits, '_' and '-'"
            )));
        }
    }
    if recipe.build.trim().is_empty() {
        return Err(err("build is empty".into()));
    }
    let mut canonical = String::new();
    canonical_json(&value, &mut canonical);
    Ok(LoadedRecipe {
        recipe,
        path: path.to_path_buf(),
        canonical,
    })
}

/// The commented template `nip recipe new <name>` writes: a recipe that builds as it is.
pub fn template(name: &str) -> String {
    TEMPLATE.replace("@NAME@", name)
}

const TEMPLATE: &str = r#"# The recipe of @NAME@ for `nip build @NAME@ [+variant...]`.
# `nip build` reads @NAME@.toml from ./recipes, then from each directory of NIP_RECIPES_PATH
# (colon-separated), then from $XDG_CONFIG_HOME/nip/recipes (see docs/source-build-guide.md).
# The cache key is made of this file's content (comments and formatting aside), the content of
# `source`, the selected variants and the platform: change any of them and the next build is a new
# artifact; keep them and every machine shares one artifact through the caches.

# Letters, digits, '.', '_' and '-' (1-100, starting with a letter or digit).
name = "@NAME@"
version = "0.1.0"
# Optional: free text.
description = "@NAME@"

# Optional: a directory relative to this file. Each build runs in a fresh copy of it, and its
# content is part of the cache key. Without it the build starts in an empty directory.
# source = "@NAME@-src"

# Optional: the names `nip build @NAME@ +variant` may select. Each selected one is exported as
# NIP_VARIANT_<VARIANT>=1 (upper case, '-' as '_'), and all of them, sorted and comma-separated, as
# NIP_VARIANTS. Each set of variants is its own artifact.
variants = []

# Run with `sh -c`. Fill $OUT, an empty directory: it becomes the artifact that the local and
# remote caches keep. Its output goes to stderr.
build = """
set -eu
mkdir -p "$OUT/share/@NAME@"
echo "@NAME@, variants: ${NIP_VARIANTS:-none}" > "$OUT/share/@NAME@/README"
"""
"#;

/// Writes [`template`] to `<dir>/<name>.toml`, creating `dir`; never replaces a file. Returns
/// the path written.
pub fn write_template(dir: &Path, name: &str) -> Result<PathBuf> {
    if !valid_name(name) || name.len() > 100 {
        return Err(ClientError::Recipe(format!(
            "invalid recipe name {name:?}: use 1-100 letters, digits, '.', '_' and '-', starting with a letter or digit"
        )));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::create_dir_all(dir)
        .map_err(|e| ClientError::Recipe(format!("cannot create {}: {e}", dir.display())))?;
    use std::io::Write;
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ClientError::Recipe(format!(
                "{} already exists: not overwritten (edit it, or remove it first)",
                path.display()
            )))
        }
        Err(e) => {
            return Err(ClientError::Recipe(format!(
                "cannot create {}: {e}",
                path.display()
            )))
        }
    };
    file.write_all(template(name).as_bytes())
        .map_err(|e| ClientError::Recipe(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

fn valid_name(s: &str) -> bool {
    nip_core::api::validate_key(s).is_ok()
}

/// Turns `+python+ruby` / `+ruby +python` style arguments into the sorted, deduplicated variant
/// list, rejecting names the recipe does not declare (the error lists the allowed ones).
pub fn select_variants(recipe: &Recipe, args: &[String]) -> Result<Vec<String>> {
    let mut chosen = BTreeSet::new();
    for arg in args {
        let Some(rest) = arg.strip_prefix('+') else {
            return Err(ClientError::Recipe(format!(
                "unexpected argument {arg:?}: variants are written +name"
            )));
        };
        for name in rest.split('+').filter(|s| !s.is_empty()) {
            if !recipe.variants.iter().any(|v| v == name) {
                return Err(ClientError::Recipe(format!(
                    "{} has no variant {name:?}; available: {}",
                    recipe.name,
                    if recipe.variants.is_empty() {
                        "none".to_string()
                    } else {
                        recipe.variants.join(", ")
                    }
                )));
            }
            chosen.insert(name.to_string());
        }
    }
    Ok(chosen.into_iter().collect())
}

/// Writes a TOML value as JSON with sorted keys (independent of serde_json's map ordering).
fn canonical_json(v: &toml::Value, out: &mut String) {
    match v {
        toml::Value::Table(t) => {
            let sorted: std::collections::BTreeMap<_, _> = t.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(v, out);
            }
            out.push('}');
        }
        toml::Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(v, out);
            }
            out.push(']');
        }
        toml::Value::String(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
        toml::Value::Integer(n) => out.push_str(&n.to_string()),
        toml::Value::Float(f) => out.push_str(&format!("{f:?}")),
        toml::Value::Boolean(b) => out.push_str(&b.to_string()),
        toml::Value::Datetime(d) => {
            out.push_str(&serde_json::Value::String(d.to_string()).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "name = \"hello\"\nversion = \"1.0\"\nvariants = [\"python\", \"ruby\"]\nbuild = \"true\"\n";

    #[test]
    fn canonical_text_ignores_formatting_and_order() {
        let a = parse(Path::new("a.toml"), HELLO).unwrap();
        let b = parse(
            Path::new("b.toml"),
            "# comment\nbuild='true'\nvariants=['python','ruby']\nversion='1.0'\nname='hello'",
        )
        .unwrap();
        assert_eq!(a.canonical, b.canonical);
    }

    #[test]
    fn variants_are_sorted_deduplicated_and_checked() {
        let r = parse(Path::new("a.toml"), HELLO).unwrap().recipe;
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let one = select_variants(&r, &s(&["+python+ruby"])).unwrap();
        let two = select_variants(&r, &s(&["+ruby", "+python", "+ruby"])).unwrap();
        assert_eq!(one, two);
        assert_eq!(one, ["python", "ruby"]);
        let err = select_variants(&r, &s(&["+perl"])).unwrap_err().to_string();
        assert!(err.contains("python, ruby"), "{err}");
    }

    #[test]
    fn bad_recipes_are_clear_errors() {
        let err = parse(Path::new("x.toml"), "name = \"a\"\nversion = \n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml") && err.contains("line 2"), "{err}");
        let err = parse(Path::new("x.toml"), "name='a/b'\nversion='1'\nbuild='x'").unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
        let err = parse(
            Path::new("x.toml"),
            "name='a'\nversion='1'\nbuild='x'\nvaraints=[]",
        );
        assert!(err.unwrap_err().to_string().contains("varaints"));
    }

    #[test]
    fn example_recipe_in_the_repository_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes");
        let r = find("hello", &[dir]).unwrap();
        assert_eq!(r.recipe.variants, ["python", "ruby"]);
        assert!(r.source_dir().unwrap().is_dir());
    }

    #[test]
    fn the_template_is_a_valid_recipe_and_is_never_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("recipes");
        let path = write_template(&dir, "my-tool").unwrap();
        assert_eq!(path, dir.join("my-tool.toml"));
        let r = find("my-tool", std::slice::from_ref(&dir)).unwrap();
        assert_eq!(
            (r.recipe.name.as_str(), r.recipe.version.as_str()),
            ("my-tool", "0.1.0")
        );
        assert!(r.source_dir().is_none() && r.recipe.variants.is_empty());
        std::fs::write(&path, HELLO).unwrap();
        let err = write_template(&dir, "my-tool").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), HELLO);
        assert!(write_template(&dir, "../x").is_err());
    }

    #[test]
    fn missing_recipe_lists_what_exists() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("hello.toml"), HELLO).unwrap();
        let dirs = vec![d.path().to_path_buf()];
        assert_eq!(find("hello", &dirs).unwrap().recipe.name, "hello");
        let err = find("nope", &dirs).unwrap_err().to_string();
        assert!(err.contains("available: hello"), "{err}");
        assert!(find("../etc/passwd", &dirs).is_err());
    }
}
