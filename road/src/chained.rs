//! Bytes in two pieces that go on the wire one after the other: a small
//! head a junction wrote and a large body it received. A megabyte message
//! keeps the buffer the Road read it into all the way to the Highway,
//! instead of being copied behind each header put in front of it.

use bytes::{BufMut, Bytes, BytesMut};

/// A head followed by a body, read as one run of bytes. Either may be
/// empty; equality is by content, not by where the split falls.
#[derive(Debug, Clone, Default)]
pub struct Chained {
    head: Bytes,
    body: Bytes,
}

impl Chained {
    /// `head` then `body`.
    pub fn new(head: Bytes, body: Bytes) -> Self {
        Self { head, body }
    }

    /// The first piece.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// The second piece.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// How many bytes in all.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether both pieces are empty.
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.body.is_empty()
    }

    /// Both pieces, head first.
    pub fn into_pieces(self) -> (Bytes, Bytes) {
        (self.head, self.body)
    }

    /// Appends both pieces to `buf`.
    pub fn put_into(&self, buf: &mut BytesMut) {
        buf.reserve(self.len());
        buf.put_slice(&self.head);
        buf.put_slice(&self.body);
    }

    /// The bytes in one piece: without copying when one piece is empty.
    pub fn to_bytes(&self) -> Bytes {
        if self.body.is_empty() {
            return self.head.clone();
        }
        if self.head.is_empty() {
            return self.body.clone();
        }
        let mut buf = BytesMut::with_capacity(self.len());
        self.put_into(&mut buf);
        buf.freeze()
    }

    /// The bytes, head then body.
    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        self.head.iter().chain(self.body.iter()).copied()
    }
}

impl From<Bytes> for Chained {
    fn from(head: Bytes) -> Self {
        Self {
            head,
            body: Bytes::new(),
        }
    }
}

impl PartialEq for Chained {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Chained {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_bytes_read_as_one_run_wherever_they_split() {
        let whole = Chained::from(Bytes::from_static(b"headbody"));
        let split = Chained::new(Bytes::from_static(b"head"), Bytes::from_static(b"body"));
        assert_eq!(whole, split);
        assert_eq!(split.len(), 8);
        assert_eq!(&split.to_bytes()[..], b"headbody");
        assert_ne!(split, Chained::from(Bytes::from_static(b"bodyhead")));
        let mut buf = BytesMut::from(&b">"[..]);
        split.put_into(&mut buf);
        assert_eq!(&buf[..], b">headbody");
        assert!(Chained::default().is_empty());
        let body = Bytes::from(vec![1u8; 100]);
        let only_body = Chained::new(Bytes::new(), body.clone());
        assert_eq!(only_body.to_bytes().as_ptr(), body.as_ptr(), "not copied");
    }
}
