//! Cron schedules as ncps reads them (robfig/cron's `ParseStandard`): five fields, the
//! descriptors `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`,
//! `@every <duration>`, and a `CRON_TZ=<zone>` or `TZ=<zone>` prefix; and the time zone they are
//! evaluated in (`--cache-lru-schedule-timezone`: an IANA name, `UTC`, or `Local`, the machine's
//! zone from `TZ` / `/etc/localtime`, as Go's `time.LoadLocation`).
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Local, TimeZone, Utc};

use super::parse_duration;

/// A time zone a schedule is evaluated in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// The machine's local zone (`TZ`, else `/etc/localtime`; UTC without either).
    Local,
    Utc,
    Named(chrono_tz::Tz),
}

impl Zone {
    /// `Local`, `UTC` (or an empty name, as Go) or an IANA name such as `Europe/Paris`.
    pub fn parse(name: &str) -> Result<Zone, String> {
        match name.trim() {
            "Local" => Ok(Zone::Local),
            "" | "UTC" => Ok(Zone::Utc),
            other => chrono_tz::Tz::from_str(other).map(Zone::Named).map_err(|_| {
                format!("unknown time zone {other:?} (use an IANA name such as Europe/Paris, UTC or Local)")
            }),
        }
    }
}

/// Longest `@every`: past it a schedule means "never", which is a configuration mistake.
const MAX_EVERY: Duration = Duration::from_secs(10 * 366 * 86_400);

#[derive(Clone, Debug)]
enum Spec {
    Cron(Box<croner::Cron>),
    /// `@every <duration>`: that long after the previous run (robfig/cron's `ConstantDelay`).
    Every(Duration),
}

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    spec: Spec,
    /// The zone of a `CRON_TZ=` / `TZ=` prefix, which wins over the configured one.
    zone: Option<Zone>,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        let (zone, rest) = match text
            .strip_prefix("CRON_TZ=")
            .or_else(|| text.strip_prefix("TZ="))
        {
            Some(prefixed) => {
                let (name, rest) = prefixed
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("{text:?}: a schedule must follow the time zone"))?;
                (Some(Zone::parse(name)?), rest.trim())
            }
            None => (None, text),
        };
        let spec = if let Some(every) = rest.strip_prefix("@every") {
            let d = parse_duration(every.trim())
                .ok_or_else(|| format!("{rest:?}: @every needs a duration such as 1h or 5m30s"))?;
            if d > MAX_EVERY {
                return Err(format!("{rest:?}: @every is at most 10 years"));
            }
            // robfig/cron rounds to whole seconds, with at least one.
            Spec::Every(Duration::from_secs(d.as_secs().max(1)))
        } else {
            let fields = rest.split_whitespace().count();
            if !rest.starts_with('@') && fields != 5 {
                return Err(format!("{rest:?} has {fields} fields; a cron schedule has 5 (minute hour day-of-month month day-of-week)"));
            }
            let expr = match rest {
                r if r.eq_ignore_ascii_case("@midnight") => "0 0 * * *",
                r => r,
            };
            let cron = croner::Cron::new(expr)
                .parse()
                .map_err(|e| format!("{rest:?} is not a cron schedule: {e}"))?;
            Spec::Cron(Box::new(cron))
        };
        Ok(Schedule { spec, zone })
    }

    /// The first run strictly after `now`, in the schedule's own zone (a `CRON_TZ=` prefix) or
    /// else `zone`; `None` when there is none.
    pub fn next_after(&self, now: DateTime<Utc>, zone: Zone) -> Option<DateTime<Utc>> {
        let cron = match &self.spec {
            // Checked: a huge `@every` must not overflow the calendar (a panic would end the job).
            Spec::Every(d) => return now.checked_add_signed(chrono::Duration::from_std(*d).ok()?),
            Spec::Cron(cron) => cron,
        };
        fn next<Tz: TimeZone>(cron: &croner::Cron, now: DateTime<Tz>) -> Option<DateTime<Utc>> {
            let next = cron.find_next_occurrence(&now, false).ok()?;
            Some(next.with_timezone(&Utc))
        }
        match self.zone.unwrap_or(zone) {
            Zone::Local => next(cron, now.with_timezone(&Local)),
            Zone::Utc => next(cron, now),
            Zone::Named(tz) => next(cron, now.with_timezone(&tz)),
        }
    }

    /// How long from `now` (the clock) until the next run.
    pub fn until_next(&self, zone: Zone) -> Option<Duration> {
        let now = Utc::now();
        (self.next_after(now, zone)? - now).to_std().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(schedule: &str, zone: &str, now: &str) -> String {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(at(now), Zone::parse(zone).unwrap())
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn the_configured_zone_moves_the_utc_instant() {
        for (schedule, zone, now, want) in [
            // 02:00 in Paris is 01:00 UTC in winter (CET) and 00:00 UTC in summer (CEST).
            (
                "0 2 * * *",
                "Europe/Paris",
                "2026-01-15T12:00:00Z",
                "2026-01-16T01:00:00+00:00",
            ),
            (
                "0 2 * * *",
                "Europe/Paris",
                "2026-07-15T12:00:00Z",
                "2026-07-16T00:00:00+00:00",
            ),
            // Midnight in Los Angeles (PST, UTC-8).
            (
                "0 0 * * *",
                "America/Los_Angeles",
                "2026-12-04T07:00:00Z",
                "2026-12-04T08:00:00+00:00",
            ),
            (
                "0 2 * * *",
                "UTC",
                "2026-01-15T12:00:00Z",
                "2026-01-16T02:00:00+00:00",
            ),
        ] {
            assert_eq!(
                next(schedule, zone, now),
                want,
                "{schedule} in {zone} after {now}"
            );
        }
    }

    #[test]
    fn a_cron_tz_prefix_wins_over_the_configured_zone() {
        for prefix in ["CRON_TZ", "TZ"] {
            assert_eq!(
                next(
                    &format!("{prefix}=Europe/Paris 0 2 * * *"),
                    "America/Los_Angeles",
                    "2026-01-15T12:00:00Z"
                ),
                "2026-01-16T01:00:00+00:00"
            );
        }
        assert!(Schedule::parse("CRON_TZ=Mars/Base 0 2 * * *").is_err());
        assert!(Schedule::parse("CRON_TZ=Europe/Paris").is_err());
    }

    #[test]
    fn descriptors_and_every() {
        let now = "2026-03-10T10:20:30Z";
        assert_eq!(next("@hourly", "UTC", now), "2026-03-10T11:00:00+00:00");
        assert_eq!(next("@daily", "UTC", now), "2026-03-11T00:00:00+00:00");
        assert_eq!(next("@midnight", "UTC", now), "2026-03-11T00:00:00+00:00");
        // 2026-03-15 is a Sunday.
        assert_eq!(next("@weekly", "UTC", now), "2026-03-15T00:00:00+00:00");
        assert_eq!(next("@monthly", "UTC", now), "2026-04-01T00:00:00+00:00");
        assert_eq!(next("@yearly", "UTC", now), "2027-01-01T00:00:00+00:00");
        assert_eq!(next("@annually", "UTC", now), "2027-01-01T00:00:00+00:00");
        assert_eq!(next("@every 1h", "UTC", now), "2026-03-10T11:20:30+00:00");
        assert_eq!(
            next("@every 1m30s", "Europe/Paris", now),
            "2026-03-10T10:22:00+00:00"
        );
        assert!(Schedule::parse("@every soon").is_err());
        // Past the calendar: refused at start, never a panic in the job.
        assert!(Schedule::parse("@every 9000000000000").is_err());
        assert!(Schedule::parse("@every 2000000h").is_err());
        assert!(Schedule::parse("@fortnightly").is_err());
        assert!(Schedule::parse("0 2 * *").is_err());
        assert!(Schedule::parse("0 0 2 * * *").is_err());
    }

    #[test]
    fn zones() {
        assert_eq!(Zone::parse("Local"), Ok(Zone::Local));
        assert_eq!(Zone::parse("UTC"), Ok(Zone::Utc));
        assert_eq!(
            Zone::parse("Europe/Paris"),
            Ok(Zone::Named(chrono_tz::Tz::Europe__Paris))
        );
        assert!(Zone::parse("Nowhere/Special").is_err());
        // Local is the machine's zone: the next run is a real instant either way.
        let s = Schedule::parse("*/5 * * * *").unwrap();
        assert!(s
            .until_next(Zone::Local)
            .is_some_and(|d| d <= Duration::from_secs(300)));
    }
}
