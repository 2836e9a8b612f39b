//! A consumer of a byte stream on its own thread, fed chunk by chunk while the stream arrives, so
//! hashing and unpacking a download overlap the transfer instead of following it.
use std::io::{BufRead, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One piece of the stream, shared by every worker that reads it.
pub type Chunk = Arc<Vec<u8>>;

/// Chunks in flight per worker: enough to ride out a slow write, little memory (chunks are
/// bounded by the reader's buffer size).
const DEPTH: usize = 16;

pub struct StreamWorker<T> {
    tx: Option<SyncSender<Chunk>>,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> StreamWorker<T> {
    /// Starts `consume` on a thread named `name`, reading the chunks fed to this worker.
    pub fn spawn(
        name: &str,
        consume: impl FnOnce(&mut ChunkReader) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(DEPTH);
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut reader = ChunkReader {
                    rx,
                    current: None,
                    pos: 0,
                };
                consume(&mut reader)
            })?;
        Ok(Self {
            tx: Some(tx),
            handle,
        })
    }

    /// Hands a chunk over, waiting while the worker is `DEPTH` chunks behind. Once the worker
    /// has stopped reading (it finished early or failed) chunks are dropped: `finish` tells why.
    pub fn feed(&mut self, chunk: &Chunk) {
        if let Some(tx) = &self.tx {
            if tx.send(Arc::clone(chunk)).is_err() {
                self.tx = None;
            }
        }
    }

    /// Ends the stream and waits for the worker's result.
    pub fn finish(mut self) -> T {
        self.tx = None;
        match self.handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// The worker's side: the fed chunks as one `Read`, ending when the feeder finishes.
pub struct ChunkReader {
    rx: Receiver<Chunk>,
    current: Option<Chunk>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The chunks themselves as the buffer: consumers that take a `BufRead` (a hasher, a zstd
/// decoder) read them without another copy.
impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.current.as_ref().is_none_or(|c| self.pos >= c.len()) {
            match self.rx.recv() {
                Ok(c) => {
                    self.current = Some(c);
                    self.pos = 0;
                }
                // The feeder is done (or gone): end of stream.
                Err(_) => return Ok(&[]),
            }
        }
        let c = self.current.as_ref().expect("set above");
        Ok(&c[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Feeds everything `r` yields to `sink` straight from its buffer.
pub fn drain(r: &mut impl BufRead, mut sink: impl FnMut(&[u8])) -> std::io::Result<u64> {
    let mut total = 0;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        let n = buf.len();
        sink(buf);
        r.consume(n);
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_see_the_whole_stream_in_order() {
        let mut a = StreamWorker::spawn("a", |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
        .unwrap();
        let mut b = StreamWorker::spawn("b", |r| {
            let mut h = sha2::Sha256::default();
            drain(r, |buf| sha2::Digest::update(&mut h, buf)).unwrap();
            sha2::Digest::finalize(h)
        })
        .unwrap();
        let mut expected = Vec::new();
        for i in 0..100u32 {
            let chunk: Chunk = Arc::new(vec![i as u8; (i as usize * 37) % 5000]);
            expected.extend_from_slice(&chunk);
            a.feed(&chunk);
            b.feed(&chunk);
        }
        assert_eq!(a.finish(), expected);
        assert_eq!(
            b.finish(),
            <sha2::Sha256 as sha2::Digest>::digest(&expected)
        );
    }

    #[test]
    fn a_worker_that_stops_early_does_not_block_the_feeder() {
        let mut w = StreamWorker::spawn("early", |r| {
            let mut first = [0u8; 10];
            r.read_exact(&mut first).unwrap();
            first
        })
        .unwrap();
        let chunk: Chunk = Arc::new(vec![7u8; 1000]);
        // Far more chunks than the channel holds: feeding must not hang once the worker is gone.
        for _ in 0..(DEPTH * 10) {
            w.feed(&chunk);
        }
        assert_eq!(w.finish(), [7u8; 10]);
    }
}
