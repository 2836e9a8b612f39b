//! `nip build`: local cache → remote → build → store locally → upload. Only the build command
//! itself can fail a build; every cache problem is a warning and the flow goes on.
use crate::artifact::{self, Packed, UnpackLimits, Unpacked};
use crate::client::{warn, Client, Fetch, Fetched};
use crate::error::{io_ctx, ClientError, Result};
use crate::key;
use crate::local::Metadata;
use crate::progress;
use crate::recipe::{self, LoadedRecipe};
use crate::record::{now_rfc3339, Op, OpKind};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub struct BuildOptions {
    pub pkg: String,
    /// `+a+b`, `+c` … as typed.
    pub variant_args: Vec<String>,
    /// `--no-remote-cache`.
    pub no_remote: bool,
    pub cwd: PathBuf,
    /// `NIP_RECIPES_PATH`.
    pub recipes_path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Local,
    Remote,
    Built,
}

/// What `nip build --json` prints.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildResult {
    pub key: String,
    pub source: Source,
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub variants: Vec<String>,
    pub platform: String,
    pub sha256: String,
    pub size: u64,
    /// Seconds this command took.
    pub elapsed_secs: f64,
    /// Whether the artifact reached a remote in this run.
    pub uploaded: bool,
    /// Build time a cache hit saved (the recorded duration of the original build); 0 when built.
    pub saved_secs: f64,
}

/// A recipe resolved to its cache key.
pub struct Resolved {
    pub recipe: LoadedRecipe,
    pub variants: Vec<String>,
    pub key: String,
    pub platform: String,
}

/// Finds the recipe, checks the variants and derives the cache key.
pub fn resolve(
    client: &Client,
    pkg: &str,
    variant_args: &[String],
    cwd: &Path,
    recipes_path: Option<&str>,
) -> Result<Resolved> {
    let dirs = recipe::search_dirs(cwd, recipes_path, &client.dirs.user_recipes());
    let recipe = recipe::find(pkg, &dirs)?;
    let variants = recipe::select_variants(&recipe.recipe, variant_args)?;
    let digest = match recipe.source_dir() {
        Some(d) if !d.is_dir() => {
            return Err(ClientError::Recipe(format!(
                "{}: source {} is not a directory",
                recipe.path.display(),
                d.display()
            )))
        }
        Some(d) => Some(key::source_digest(&d)?),
        None => None,
    };
    let platform = key::platform();
    let key = key::cache_key(&recipe, digest.as_deref(), &variants, &platform);
    Ok(Resolved {
        recipe,
        variants,
        key,
        platform,
    })
}

pub fn build(client: &Client, opts: &BuildOptions) -> Result<BuildResult> {
    let started = Instant::now();
    let r = resolve(
        client,
        &opts.pkg,
        &opts.variant_args,
        &opts.cwd,
        opts.recipes_path.as_deref(),
    )?;
    let pkgs = client.dirs.pkgs();
    let finish = |meta: &Metadata, source: Source, path: PathBuf, uploaded: bool| BuildResult {
        key: r.key.clone(),
        source,
        path,
        name: meta.name.clone(),
        version: meta.version.clone(),
        variants: meta.variants.clone(),
        platform: meta.platform.clone(),
        sha256: meta.sha256.clone(),
        size: meta.size,
        elapsed_secs: started.elapsed().as_secs_f64(),
        uploaded,
        saved_secs: match source {
            Source::Local | Source::Remote => meta.build_duration_secs,
            Source::Built => 0.0,
        },
    };
    // 1. Local cache.
    if let Some((meta, path)) = from_local(client, &r.key, &pkgs) {
        return Ok(finish(&meta, Source::Local, path, false));
    }
    // 2. Remote.
    let remote_on = !opts.no_remote && client.config.enabled && !client.config.servers.is_empty();
    if remote_on {
        client.skip_recently_unreachable();
    }
    if remote_on && client.config.policies.download_before_build {
        if let Some((meta, path)) = from_remote(client, &r, &pkgs)? {
            return Ok(finish(&meta, Source::Remote, path, false));
        }
    }
    // 3. Build, 4. store locally, 5. upload.
    let (meta, path) = build_and_store(client, &r, &pkgs)?;
    let uploaded = remote_on && client.config.policies.upload_on_build && upload(client, &meta);
    Ok(finish(&meta, Source::Built, path, uploaded))
}

/// A cache hit as recorded in the operation log: the build time it saved.
fn hit_op(key: &str, source: &str, meta: &Metadata) -> Op {
    let mut op = Op::new(OpKind::Build, key, source);
    op.saved_secs = Some(meta.build_duration_secs);
    op
}

/// The metadata of `r`'s package for an archive of `sha256` and `size`.
fn metadata(
    r: &Resolved,
    sha256: String,
    size: u64,
    secs: f64,
    host: String,
    created: String,
) -> Metadata {
    Metadata {
        name: r.recipe.recipe.name.clone(),
        version: r.recipe.recipe.version.clone(),
        variants: r.variants.clone(),
        key: r.key.clone(),
        platform: r.platform.clone(),
        sha256,
        size,
        build_duration_secs: secs,
        builder_host: host,
        created,
    }
}

/// The package from the local cache, unpacked; an unusable entry is discarded.
fn from_local(client: &Client, key: &str, pkgs: &Path) -> Option<(Metadata, PathBuf)> {
    let meta = client.local.get(key)?;
    match use_artifact(client, &meta, pkgs, Verified::No) {
        Ok(path) => {
            client.log(hit_op(key, "local", &meta));
            Some((meta, path))
        }
        Err(e) if e.blames_the_artifact() => {
            warn(&format!(
                "Local cache entry {key} is unusable, discarded: {e}"
            ));
            client.local.remove(key);
            None
        }
        Err(e) => {
            warn(&format!("Local cache entry {key} cannot be used: {e}"));
            None
        }
    }
}

/// The package from the remote cache, unpacked while it downloads. `None` on a miss or an
/// unusable download (the build goes on); an error only when the remote failed and
/// `policies.fallbackToLocal` is off.
fn from_remote(client: &Client, r: &Resolved, pkgs: &Path) -> Result<Option<(Metadata, PathBuf)>> {
    let key = &r.key;
    let fallback = |info: &crate::remote::Found| {
        metadata(
            r,
            info.sha256.clone().unwrap_or_default(),
            info.size.unwrap_or(0),
            0.0,
            "unknown".into(),
            info.created_at.clone().unwrap_or_else(now_rfc3339),
        )
    };
    match client.fetch(key, &fallback, Some(pkgs)) {
        // The download was hashed (and unpacked) as it streamed in: no second pass over it.
        Fetch::Hit(hit) => {
            let Fetched { meta, unpacked } = *hit;
            let used = match unpacked {
                Some(unpacked) => unpacked.and_then(Unpacked::publish),
                None => use_artifact(client, &meta, pkgs, Verified::JustDownloaded),
            };
            match used {
                Ok(path) => {
                    client.log(hit_op(key, "remote", &meta));
                    Ok(Some((meta, path)))
                }
                Err(e) if e.blames_the_artifact() => {
                    warn(&format!(
                        "Remote artifact {key} cannot be used, discarded: {e}"
                    ));
                    client.local.remove(key);
                    Ok(None)
                }
                Err(e) => {
                    warn(&format!("Remote artifact {key} cannot be used: {e}"));
                    Ok(None)
                }
            }
        }
        Fetch::Failed if !client.config.policies.fallback_to_local => {
            Err(ClientError::BuildFailed {
                key: key.clone(),
                message: "the remote cache failed and policies.fallbackToLocal is false".into(),
            })
        }
        Fetch::Miss | Fetch::Failed => Ok(None),
    }
}

/// Runs the recipe, stores the archive in the local cache and unpacks it.
fn build_and_store(client: &Client, r: &Resolved, pkgs: &Path) -> Result<(Metadata, PathBuf)> {
    let key = &r.key;
    let (packed, secs) = match run_build(client, r) {
        Ok(x) => x,
        Err(e) => {
            let mut op = Op::new(OpKind::Build, key, "failed");
            op.detail = Some(e.to_string());
            client.log(op);
            return Err(e);
        }
    };
    let meta = metadata(
        r,
        packed.sha256.clone(),
        packed.size,
        secs,
        builder_host(),
        now_rfc3339(),
    );
    client.local.insert(packed.file, &meta)?;
    // Packed just now from this build's own output: no bound (a cache limit never fails a build).
    let archive = client.local.artifact_path(key);
    let path = artifact::unpack(&archive, pkgs, key, &UnpackLimits::UNLIMITED)?;
    let mut op = Op::new(OpKind::Build, key, "built");
    op.duration_ms = Some((secs * 1000.0) as u64);
    client.log(op);
    Ok((meta, path))
}

/// Uploads a fresh build; a failure is a warning, never a failed build.
fn upload(client: &Client, meta: &Metadata) -> bool {
    match client.push(meta, false) {
        Ok(_) => true,
        Err(errors) if errors.is_empty() => {
            warn("Remote upload skipped: no reachable remote cache (local cache still available)");
            false
        }
        Err(errors) => {
            for e in errors {
                warn(&format!(
                    "Remote upload failed (local cache still available): {e}"
                ));
            }
            false
        }
    }
}

/// Whether the archive's SHA-256 was checked while it was written just now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verified {
    No,
    JustDownloaded,
}

/// Returns the unpacked package, verifying the archive first when it has to be unpacked or the
/// package compared with it after a reboot (unless it was verified while being downloaded).
fn use_artifact(
    client: &Client,
    meta: &Metadata,
    pkgs: &Path,
    verified: Verified,
) -> Result<PathBuf> {
    if crate::pkgs::trusted(pkgs, &meta.key)? {
        return Ok(pkgs.join(&meta.key));
    }
    let archive = client.local.artifact_path(&meta.key);
    let limits = client.config.policies.unpack_limits();
    if verified == Verified::JustDownloaded {
        return artifact::unpack(&archive, pkgs, &meta.key, &limits);
    }
    let actual = artifact::file_sha256(&archive)?;
    if !actual.eq_ignore_ascii_case(&meta.sha256) {
        return Err(ClientError::Corrupt(
            meta.key.clone(),
            format!("sha256 {actual}, expected {}", meta.sha256),
        ));
    }
    artifact::unpack(&archive, pkgs, &meta.key, &limits)
}

/// Runs the recipe's build command in a fresh copy of the source and packs `$OUT`.
fn run_build(client: &Client, r: &Resolved) -> Result<(Packed, f64)> {
    let work_root = client.dirs.cache.join("tmp");
    std::fs::create_dir_all(&work_root)
        .map_err(io_ctx(format!("create {}", work_root.display())))?;
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&work_root)
        .map_err(io_ctx(format!(
            "create a directory in {}",
            work_root.display()
        )))?;
    let src = work.path().join("src");
    let out = work.path().join("out");
    match r.recipe.source_dir() {
        Some(d) => copy_tree(&d, &src)?,
        None => std::fs::create_dir(&src).map_err(io_ctx(format!("create {}", src.display())))?,
    }
    std::fs::create_dir(&out).map_err(io_ctx(format!("create {}", out.display())))?;

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&r.recipe.recipe.build)
        .current_dir(&src)
        .env("OUT", &out)
        .env("NIP_VARIANTS", r.variants.join(","))
        .stdin(Stdio::null());
    // Variants come only from this build, never from the caller's environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NIP_VARIANT_") {
            cmd.env_remove(k);
        }
    }
    for v in &r.variants {
        cmd.env(
            format!("NIP_VARIANT_{}", v.to_ascii_uppercase().replace('-', "_")),
            "1",
        );
    }
    // The build's output goes to stderr so stdout carries only our result (the path or JSON).
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    eprintln!("🔨 Building {} ({})", r.key, r.recipe.path.display());
    let spinner = progress::spinner(&format!("building {}", r.key));
    let t0 = Instant::now();
    let status = cmd.status();
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let secs = t0.elapsed().as_secs_f64();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            return Err(ClientError::BuildFailed {
                key: r.key.clone(),
                message: format!("the build command exited with {s}"),
            })
        }
        Err(e) => {
            return Err(ClientError::BuildFailed {
                key: r.key.clone(),
                message: format!("cannot run sh: {e}"),
            })
        }
    }
    let packed = artifact::pack(&out, client.local.dir())?;
    Ok((packed, secs))
}

/// Copies a directory tree, keeping symlinks as symlinks and file modes.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_ctx(format!("create {}", to.display())))?;
    let rd = std::fs::read_dir(from).map_err(io_ctx(format!("read {}", from.display())))?;
    for e in rd {
        let e = e.map_err(io_ctx(format!("read {}", from.display())))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e
            .file_type()
            .map_err(io_ctx(format!("stat {}", src.display())))?;
        if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ft.is_symlink() {
            let t =
                std::fs::read_link(&src).map_err(io_ctx(format!("readlink {}", src.display())))?;
            std::os::unix::fs::symlink(t, &dst)
                .map_err(io_ctx(format!("symlink {}", dst.display())))?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(io_ctx(format!("copy {}", src.display())))?;
        }
    }
    Ok(())
}

/// This machine's host name, for the metadata.
pub fn builder_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
