//! Content codings of query results: which one a request gets (`Accept-Encoding`) and the
//! compressor that runs on the query's thread, between the encoder and the response.
//!
//! zstd and gzip, each at its fastest level (an export is bound by the compressor, and level 1
//! keeps most of the ratio: see `docs/benchmarks.md`); brotli is not offered (its fast levels
//! are slower than zstd's for a worse ratio). Parquet is never compressed again: its pages are.
//! A result is compressed as it is encoded, so a whole result in the result cache is kept per
//! coding, and a streamed one is compressed chunk by chunk.

use std::io::Write;

use ferrocorn_query_core::Format;

/// A response's content coding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coding {
    Identity,
    Zstd,
    Gzip,
}

impl Coding {
    /// The `Content-Encoding` token, `None` for identity.
    pub fn token(self) -> Option<&'static str> {
        match self {
            Self::Identity => None,
            Self::Zstd => Some("zstd"),
            Self::Gzip => Some("gzip"),
        }
    }

    /// The coding `format` is sent with for `accept_encoding`: the client's most preferred of
    /// zstd and gzip (q-values honoured, zstd first on a tie), identity when it accepts neither
    /// or the format is Parquet.
    pub fn negotiate(format: Format, accept_encoding: Option<&str>) -> Self {
        let Some(accept) = accept_encoding else {
            return Self::Identity;
        };
        if format == Format::Parquet {
            return Self::Identity;
        }
        let mut best = (Self::Identity, 0.0f32);
        for coding in [Self::Zstd, Self::Gzip] {
            let Some(token) = coding.token() else {
                continue;
            };
            let mut q_for: Option<(f32, bool)> = None;
            for item in accept.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let exact = name == token;
                if !exact && name != "*" {
                    continue;
                }
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0)
                    .clamp(0.0, 1.0);
                // The coding's own entry beats a wildcard.
                if q_for.is_none_or(|(_, was_exact)| exact && !was_exact) {
                    q_for = Some((q, exact));
                }
            }
            if let Some((q, _)) = q_for
                && q > best.1
            {
                best = (coding, q);
            }
        }
        best.0
    }

    /// A compressor for this coding, `None` for identity.
    pub fn compressor(self) -> Option<Compressor> {
        let inner = match self {
            Self::Identity => return None,
            // Level 1: the fastest of the standard levels.
            Self::Zstd => Inner::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 1).ok()?),
            Self::Gzip => Inner::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
        };
        Some(Compressor(inner))
    }
}

/// Compresses a result's bytes as they come.
pub struct Compressor(Inner);

enum Inner {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    /// Compress `bytes`; the compressed bytes ready so far (possibly none: the compressor keeps
    /// up to a block).
    pub fn push(&mut self, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        match &mut self.0 {
            Inner::Zstd(e) => {
                e.write_all(bytes)?;
                Ok(std::mem::take(e.get_mut()))
            }
            Inner::Gzip(e) => {
                e.write_all(bytes)?;
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }

    /// The rest of the compressed stream.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        match self.0 {
            Inner::Zstd(e) => e.finish(),
            Inner::Gzip(e) => e.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn negotiation_prefers_zstd_honours_q_values_and_never_recompresses_parquet() {
        let pick = |accept| Coding::negotiate(Format::Json, accept);
        assert_eq!(pick(None), Coding::Identity);
        assert_eq!(pick(Some("")), Coding::Identity);
        assert_eq!(pick(Some("gzip, deflate, br, zstd")), Coding::Zstd);
        assert_eq!(pick(Some("gzip")), Coding::Gzip);
        assert_eq!(pick(Some("zstd;q=0.5, gzip")), Coding::Gzip);
        assert_eq!(pick(Some("GZIP;q=0.8, zstd;q=0")), Coding::Gzip);
        assert_eq!(pick(Some("*")), Coding::Zstd);
        assert_eq!(pick(Some("*;q=0.5, zstd;q=0")), Coding::Gzip);
        assert_eq!(pick(Some("br, deflate")), Coding::Identity);
        assert_eq!(pick(Some("gzip;q=0")), Coding::Identity);
        assert_eq!(
            Coding::negotiate(Format::Parquet, Some("zstd, gzip")),
            Coding::Identity
        );
        assert_eq!(Coding::negotiate(Format::Csv, Some("gzip")), Coding::Gzip);
    }

    #[test]
    fn compressed_chunks_decompress_to_the_input() {
        let input: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{{\"row\":{i}}}\n").into_bytes())
            .collect();
        for coding in [Coding::Zstd, Coding::Gzip] {
            let mut compressor = coding.compressor().expect("a compressor");
            let mut out = Vec::new();
            for chunk in input.chunks(10_000) {
                out.extend(compressor.push(chunk).expect("push"));
            }
            out.extend(compressor.finish().expect("finish"));
            assert!(
                out.len() < input.len() / 4,
                "{coding:?}: {} bytes",
                out.len()
            );
            let mut back = Vec::new();
            match coding {
                Coding::Zstd => {
                    zstd::stream::read::Decoder::new(out.as_slice())
                        .expect("decoder")
                        .read_to_end(&mut back)
                        .expect("zstd");
                }
                _ => {
                    flate2::read::GzDecoder::new(out.as_slice())
                        .read_to_end(&mut back)
                        .expect("gzip");
                }
            }
            assert_eq!(back, input, "{coding:?}");
        }
    }
}
