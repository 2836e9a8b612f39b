//! SQLite: rows fetched from upstreams (narinfos with their sources, and the rows of fetched
//! NARs) are inserted many per statement. Nix asks for 25 narinfos at a time; each miss took the
//! one writer in turn for its two statements, so a burst of misses queued behind each other's
//! round trips to SQLite's worker thread (500 misses: 0.28 s; 0.10 s with the inserts left out).
//! Now the rows that wait while a batch is written go into the next batch together: at most three
//! statements (sources, narinfos, NARs) for however many are waiting. One row alone is written
//! as before, without delay. Uploads are not batched: they are written durably, one by one.
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sqlx::AnyPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::meta::{MetaError, NarInfoRecord, NarRecord, NarSource, PutNarInfo};
use crate::sql::{narinfo_from_row, sources_insert, Backend, NARINFO_COLUMNS};

/// The most narinfos in one statement (12 parameters each, far below SQLite's 32 766).
const BATCH_MAX: usize = 64;
/// The most source rows in one statement (4 parameters each).
const SOURCES_MAX: usize = 1024;
/// Narinfos waiting for their batch; past this, callers wait to queue.
const QUEUE: usize = 1024;

enum Job {
    Narinfo {
        rec: NarInfoRecord,
        sources: Vec<NarSource>,
        reply: oneshot::Sender<Result<PutNarInfo, MetaError>>,
    },
    Nar {
        rec: NarRecord,
        reply: oneshot::Sender<Result<(), MetaError>>,
    },
}

impl Job {
    /// The key a second row in one batch must not repeat (see `run`).
    fn key(&self) -> (bool, &str) {
        match self {
            Job::Narinfo { rec, .. } => (true, &rec.hash),
            Job::Nar { rec, .. } => (false, &rec.nar_file),
        }
    }

    fn sources(&self) -> usize {
        match self {
            Job::Narinfo { sources, .. } => sources.len(),
            Job::Nar { .. } => 0,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    taken: AtomicUsize,
    batches: AtomicUsize,
    /// Batches the database refused, written again row by row.
    fallbacks: AtomicUsize,
}

/// The queue to the one task that writes fetched rows (see the module).
#[derive(Clone, Debug)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Job>,
    /// Rows taken from the queue (a row held for the next batch counts once) and batches
    /// written so far (tests read them).
    #[cfg_attr(not(test), allow(dead_code))]
    counts: Arc<Counts>,
}

impl Batcher {
    /// Starts the writing task on `pool`, taking `gate` (this process's turn to write) per batch.
    pub(crate) fn start(pool: AnyPool, gate: Arc<Mutex<()>>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        tokio::spawn(run(rx, pool, gate, counts.clone()));
        Batcher { tx, counts }
    }

    /// Queues a fetched narinfo for the next batch. `None` when the writing task is gone (its
    /// runtime shut down): the caller then writes it alone.
    pub(crate) async fn put_narinfo(
        &self,
        rec: &NarInfoRecord,
        sources: &[NarSource],
    ) -> Option<Result<PutNarInfo, MetaError>> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Narinfo {
            rec: rec.clone(),
            sources: sources.to_vec(),
            reply,
        };
        self.tx.send(job).await.ok()?;
        answer.await.ok()
    }

    /// Rows taken from the queue, batches written, and batches written again row by row, so far.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let c = &self.counts;
        (
            c.taken.load(Ordering::Relaxed),
            c.batches.load(Ordering::Relaxed),
            c.fallbacks.load(Ordering::Relaxed),
        )
    }

    /// Rows waiting for the writing task.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues a fetched NAR's row, as [`Batcher::put_narinfo`].
    pub(crate) async fn put_nar(&self, rec: &NarRecord) -> Option<Result<(), MetaError>> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Nar {
            rec: rec.clone(),
            reply,
        };
        self.tx.send(job).await.ok()?;
        answer.await.ok()
    }
}

fn key(job: &Job) -> (bool, String) {
    let (narinfo, k) = job.key();
    (narinfo, k.to_string())
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    pool: AnyPool,
    gate: Arc<Mutex<()>>,
    counts: Arc<Counts>,
) {
    let mut next: Option<Job> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => {
                    counts.taken.fetch_add(1, Ordering::Relaxed);
                    job
                }
                None => return,
            },
        };
        let mut keys = HashSet::from([key(&first)]);
        let mut sources = first.sources();
        let mut batch = vec![first];
        // Whatever queued meanwhile, up to the limits; a second row for a key in this batch starts
        // the next one, so each narinfo is told truly whether it was the one inserted.
        while batch.len() < BATCH_MAX && sources < SOURCES_MAX {
            let Ok(job) = rx.try_recv() else { break };
            counts.taken.fetch_add(1, Ordering::Relaxed);
            if !keys.insert(key(&job)) {
                next = Some(job);
                break;
            }
            sources += job.sources();
            batch.push(job);
        }
        let _turn = crate::sql::take_turn(Some(&gate)).await;
        write(&pool, batch, &counts).await;
        counts.batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes `batch` and answers each job. Should the batch fail, each is written alone, so one
/// bad row fails only its own request.
async fn write(pool: &AnyPool, batch: Vec<Job>, counts: &Counts) {
    let inserted = match batch.len() {
        1 => None,
        _ => match insert_all(pool, &batch).await {
            Ok(inserted) => Some(inserted),
            Err(e) => {
                tracing::debug!(error = %e, rows = batch.len(), "batched insert failed; writing each row alone");
                counts.fallbacks.fetch_add(1, Ordering::Relaxed);
                None
            }
        },
    };
    for job in batch {
        match (job, &inserted) {
            (Job::Narinfo { rec, reply, .. }, Some(inserted)) => {
                let result = match inserted.contains(&rec.hash) {
                    true => Ok(PutNarInfo::Inserted),
                    false => stored(pool, &rec.hash).await,
                };
                let _ = reply.send(result);
            }
            (Job::Nar { reply, .. }, Some(_)) => {
                let _ = reply.send(Ok(()));
            }
            (
                Job::Narinfo {
                    rec,
                    sources,
                    reply,
                },
                None,
            ) => {
                let done = crate::sql::put_narinfo_alone(pool, Backend::Sqlite, &rec, &sources);
                let _ = reply.send(done.await);
            }
            (Job::Nar { rec, reply }, None) => {
                let _ = reply.send(crate::sql::put_nar_alone(pool, Backend::Sqlite, &rec).await);
            }
        }
    }
}

/// The sources of every narinfo, then the narinfos, then the NAR rows: the hashes inserted (a hash stored before is
/// left as it is, immutable).
async fn insert_all(pool: &AnyPool, batch: &[Job]) -> Result<HashSet<String>, MetaError> {
    let narinfos: Vec<(&NarInfoRecord, &[NarSource])> = batch
        .iter()
        .filter_map(|job| match job {
            Job::Narinfo { rec, sources, .. } => Some((rec, sources.as_slice())),
            Job::Nar { .. } => None,
        })
        .collect();
    let nars: Vec<&NarRecord> = batch
        .iter()
        .filter_map(|job| match job {
            Job::Nar { rec, .. } => Some(rec),
            Job::Narinfo { .. } => None,
        })
        .collect();
    // One transaction: a batch is one commit, and a batch refused halfway leaves nothing behind
    // for the rows written again alone (a narinfo of its own would then look stored by another).
    let mut tx = pool.begin().await?;
    insert_sources(&mut tx, &narinfos).await?;
    let inserted = insert_narinfos(&mut tx, &narinfos).await?;
    insert_nars(&mut tx, &nars).await?;
    tx.commit().await?;
    Ok(inserted)
}

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// The sources of every narinfo, one row per (NAR file, URL): two narinfos of one NAR file may
/// name the same URL.
async fn insert_sources(
    tx: &mut Tx,
    narinfos: &[(&NarInfoRecord, &[NarSource])],
) -> Result<(), MetaError> {
    let mut seen = HashSet::new();
    let sources: Vec<(&str, usize, &NarSource)> = narinfos
        .iter()
        .flat_map(|(rec, sources)| {
            crate::sql::ranked_sources(sources)
                .into_iter()
                .map(|(rank, s)| (rec.nar_file.as_str(), rank, s))
        })
        .filter(|(file, _, s)| seen.insert((*file, s.url.as_str())))
        .collect();
    if sources.is_empty() {
        return Ok(());
    }
    let sql = sources_insert(sources.len());
    let mut q = batch_query(&sql);
    for (file, rank, s) in &sources {
        q = q
            .bind(*file)
            .bind(&s.url)
            .bind(&s.upstream)
            .bind(*rank as i64);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// The narinfos: the hashes inserted (a hash stored before is left as it is, immutable).
async fn insert_narinfos(
    tx: &mut Tx,
    narinfos: &[(&NarInfoRecord, &[NarSource])],
) -> Result<HashSet<String>, MetaError> {
    if narinfos.is_empty() {
        return Ok(HashSet::new());
    }
    let now = crate::unix_now();
    let sql = format!(
        "INSERT INTO narinfos ({NARINFO_COLUMNS}, created_at, last_accessed_at) VALUES {} \
         ON CONFLICT (hash) DO NOTHING RETURNING hash",
        values(narinfos.len(), 12)
    );
    let mut q = batch_query(&sql);
    for (r, _) in narinfos {
        q = crate::sql::bind_narinfo(q, r, now, now);
    }
    let rows = q.fetch_all(&mut **tx).await?;
    rows.iter()
        .map(|row| row.try_get::<String, _>("hash"))
        .collect::<Result<_, _>>()
        .map_err(Into::into)
}

/// The NAR rows, as [`crate::sql::put_nar_alone`] writes one.
async fn insert_nars(tx: &mut Tx, nars: &[&NarRecord]) -> Result<(), MetaError> {
    if nars.is_empty() {
        return Ok(());
    }
    let now = crate::unix_now();
    let sql = crate::sql::nars_insert(&values(nars.len(), 5));
    let mut q = batch_query(&sql);
    for r in nars {
        q = q
            .bind(&r.nar_file)
            .bind(r.size)
            .bind(&r.sha256)
            .bind(now)
            .bind(now);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// A statement whose text depends on the batch's size: not kept prepared, so the batches' many
/// shapes do not push the hot statements out of the connection's statement cache.
fn batch_query(sql: &str) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(sql).persistent(false)
}

/// `rows` parenthesised groups of `columns` placeholders, numbered from `$1`.
fn values(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|i| {
            let p: Vec<String> = (1..=columns)
                .map(|c| format!("${}", columns * i + c))
                .collect();
            format!("({})", p.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The narinfo stored for `hash` before this batch.
async fn stored(pool: &AnyPool, hash: &str) -> Result<PutNarInfo, MetaError> {
    let row = sqlx::query(&format!(
        "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE hash = $1"
    ))
    .bind(hash)
    .fetch_one(pool)
    .await?;
    Ok(PutNarInfo::Exists(Box::new(narinfo_from_row(&row)?)))
}

#[cfg(test)]
mod tests {
    use crate::meta::{MetaStore, NarInfoRecord, NarRecord, NarSource, PutNarInfo};
    use crate::sql::tests::rec;
    use crate::sql::SqlMeta;

    fn source(nar_file: &str, up: &str) -> NarSource {
        NarSource {
            url: format!("{up}/nar/{nar_file}"),
            upstream: up.into(),
        }
    }

    enum Put {
        Narinfo(NarInfoRecord, Vec<NarSource>),
        Nar(NarRecord),
    }

    enum Done {
        Narinfo(Result<PutNarInfo, crate::meta::MetaError>),
        Nar(Result<(), crate::meta::MetaError>),
    }

    async fn fresh() -> (SqlMeta, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
        (SqlMeta::connect(&url).await.unwrap(), dir)
    }

    /// Runs `puts` at once while this process's turn to write is held, so that all of them queue
    /// and are written in as few batches as the limits allow; their results, in order, and how
    /// many batches had to be written again row by row.
    async fn queued_together(meta: &SqlMeta, puts: Vec<Put>) -> (Vec<Done>, usize) {
        let batcher = meta.batcher().expect("a SQLite file has a batcher").clone();
        let turn = meta.write_turn().await;
        let n = puts.len();
        let (taken_before, batches_before, fallbacks_before) = batcher.counts();
        let tasks: Vec<_> = puts
            .into_iter()
            .map(|put| {
                let meta = meta.clone();
                tokio::spawn(async move {
                    match put {
                        Put::Narinfo(rec, sources) => {
                            Done::Narinfo(meta.put_narinfo(&rec, &sources).await)
                        }
                        Put::Nar(rec) => Done::Nar(meta.put_fetched_nar(&rec).await),
                    }
                })
            })
            .collect();
        // The writing task takes the first rows and waits for the turn; the rest queue.
        let all_queued = async {
            while batcher.counts().0 - taken_before + batcher.queued() < n {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), all_queued)
            .await
            .expect("every row reaches the queue");
        drop(turn);
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        // What the task took before the turn, then the rest by the batch (one more batch for a
        // hash repeated in the queue); one by one would be n.
        let (_, batches, fallbacks) = batcher.counts();
        let batches = batches - batches_before;
        assert!(
            batches <= 2 + n.div_ceil(super::BATCH_MAX),
            "{n} rows took {batches} batches"
        );
        (done, fallbacks - fallbacks_before)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_queued_together_are_written_together_and_each_is_told_its_own_outcome() {
        let (meta, _dir) = fresh().await;
        // A narinfo stored before: the batch must leave it and say so.
        let before = rec("h0", "f0.nar");
        meta.put_narinfo(&before, &[]).await.unwrap();
        let mut puts = Vec::new();
        for i in 1..=40 {
            let file = format!("f{i}.nar");
            // Two upstreams, and the first named twice: one row per URL, in rank order.
            let sources = vec![
                source(&file, "http://a"),
                source(&file, "http://a"),
                source(&file, "http://b"),
            ];
            puts.push(Put::Narinfo(rec(&format!("h{i}"), &file), sources));
            puts.push(Put::Nar(NarRecord {
                nar_file: format!("n{i}.nar"),
                size: i,
                sha256: format!("{i:02}"),
            }));
        }
        let mut again = rec("h0", "other.nar");
        again.nar_hash = "sha256:other".into();
        puts.push(Put::Narinfo(again, vec![source("other.nar", "http://a")]));
        // The same hash twice in one queue: the second goes into the next batch and learns that
        // the first was stored.
        puts.push(Put::Narinfo(rec("h1", "f1.nar"), vec![]));
        let (done, fallbacks) = queued_together(&meta, puts).await;
        assert_eq!(fallbacks, 0, "the batches were written as batches");

        // Rows queue in whatever order their tasks ran: of the two for h1 either may be first.
        let (mut inserted, mut exists) = (0, Vec::new());
        for (i, d) in done.into_iter().enumerate() {
            match d {
                Done::Narinfo(Ok(PutNarInfo::Inserted)) => inserted += 1,
                Done::Narinfo(Ok(PutNarInfo::Exists(stored))) => exists.push(stored.hash),
                Done::Nar(Ok(())) => {}
                Done::Narinfo(Err(e)) | Done::Nar(Err(e)) => panic!("row {i}: {e}"),
            }
        }
        assert_eq!(inserted, 40);
        exists.sort();
        assert_eq!(exists, ["h0", "h1"]);
        assert_eq!(meta.get_narinfo("h0").await.unwrap(), Some(before));
        for i in 1..=40 {
            let file = format!("f{i}.nar");
            assert_eq!(
                meta.get_narinfo(&format!("h{i}")).await.unwrap(),
                Some(rec(&format!("h{i}"), &file))
            );
            assert_eq!(
                meta.nar_sources(&file).await.unwrap(),
                vec![source(&file, "http://a"), source(&file, "http://b")]
            );
            let nar = meta.get_nar(&format!("n{i}.nar")).await.unwrap().unwrap();
            assert_eq!((nar.size, nar.sha256), (i, format!("{i:02}")));
        }
        // The refused narinfo's sources stay as alternatives for its NAR file, as when alone.
        assert_eq!(
            meta.nar_sources("other.nar").await.unwrap(),
            vec![source("other.nar", "http://a")]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_the_database_refuses_fails_alone() {
        let (meta, _dir) = fresh().await;
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON narinfos WHEN NEW.hash LIKE 'bad%' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(meta.pool())
        .await
        .unwrap();
        // Two refused rows: whichever batches the rows fall into, one batch holds a refused row
        // and another row (only the first batch can be a single row).
        let hashes = ["a", "bad1", "c", "bad2", "d"];
        let puts = hashes
            .iter()
            .map(|h| Put::Narinfo(rec(h, &format!("{h}.nar")), vec![]))
            .collect();
        let (done, fallbacks) = queued_together(&meta, puts).await;
        assert!(
            fallbacks >= 1,
            "a batch with a refused row was written again row by row"
        );
        for (h, d) in hashes.iter().zip(done) {
            match d {
                Done::Narinfo(Err(e)) if h.starts_with("bad") => {
                    assert!(e.to_string().contains("refused"), "{e}")
                }
                Done::Narinfo(Ok(PutNarInfo::Inserted)) if !h.starts_with("bad") => {
                    assert!(meta.get_narinfo(h).await.unwrap().is_some())
                }
                _ => panic!("{h}: unexpected outcome"),
            }
        }
        assert!(meta.get_narinfo("bad1").await.unwrap().is_none());
    }
}
