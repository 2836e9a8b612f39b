//! `nip cache list` and `nip cache stats`: local artifacts, recent operations and the figures
//! computed from the operation record.
use anyhow::Result;
use clap::ValueEnum;
use nip_client::record::{self, now_unix};
use nip_client::Client;

/// `nip cache list --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Table,
    // One cache key per line.
    Simple,
    Json,
}

/// The local artifacts, or with `recent` the last `limit` cache operations, newest first.
pub fn list(c: &Client, format: ListFormat, recent: bool, limit: usize) -> Result<()> {
    if recent {
        let mut ops = c.record.read();
        ops.reverse();
        ops.truncate(limit);
        match format {
            ListFormat::Json => println!("{}", serde_json::to_string_pretty(&ops)?),
            ListFormat::Simple => ops.iter().for_each(|o| println!("{}", o.key)),
            ListFormat::Table => {
                println!(
                    "{:<20} {:<8} {:<8} {:<50} SERVER",
                    "AT", "OP", "OUTCOME", "KEY"
                );
                for o in &ops {
                    let op = serde_json::to_value(o.op)?;
                    println!(
                        "{:<20} {:<8} {:<8} {:<50} {}",
                        o.at,
                        op.as_str().unwrap_or(""),
                        o.outcome,
                        o.key,
                        o.server.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        return Ok(());
    }
    let all = c.local.list();
    match format {
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&all)?),
        ListFormat::Simple => all.iter().for_each(|a| println!("{}", a.key)),
        ListFormat::Table => {
            println!(
                "{:<50} {:<16} {:<10} {:<16} {:>10} CREATED",
                "KEY", "NAME", "VERSION", "VARIANTS", "SIZE"
            );
            for a in &all {
                println!(
                    "{:<50} {:<16} {:<10} {:<16} {:>10} {}",
                    a.key,
                    a.name,
                    a.version,
                    if a.variants.is_empty() {
                        "-".to_string()
                    } else {
                        a.variants.join(",")
                    },
                    human_bytes(a.size),
                    a.created
                );
            }
        }
    }
    Ok(())
}

pub fn stats(c: &Client, json: bool) -> Result<()> {
    let s = record::stats(
        &c.record.read(),
        &c.local.list(),
        c.local.size(),
        now_unix(),
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let pct = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{:.1}%", r * 100.0));
    println!("Cache Statistics");
    println!("================");
    println!(
        "Builds: {} (local hits {}, remote hits {}, built {}, failed {})",
        s.builds, s.local_hits, s.remote_hits, s.built, s.failed_builds
    );
    println!("Hit rate: {}", pct(s.hit_rate));
    println!(
        "Uploads: {} ({} succeeded)",
        s.uploads,
        pct(s.upload_success_rate)
    );
    println!(
        "Downloads: {} ({} succeeded)",
        s.downloads,
        pct(s.download_success_rate)
    );
    println!(
        "Average download time: {}",
        s.avg_download_ms
            .map_or("n/a".to_string(), |ms| format!("{ms:.0} ms"))
    );
    println!(
        "Local cache: {} artifacts, {}",
        s.local_artifacts,
        human_bytes(s.local_cache_bytes)
    );
    println!(
        "Average cache age: {}",
        s.avg_cache_age_secs.map_or("n/a".to_string(), |a| {
            humantime::format_duration(std::time::Duration::from_secs(a as u64)).to_string()
        })
    );
    println!("Build time saved: {:.1} s", s.build_time_saved_secs);
    Ok(())
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
