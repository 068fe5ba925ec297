//! The control-message decoder, for every message type, and the fixed-size headers.
//!
//! Input: a frame body (what follows the length prefix). Properties: decoding never
//! panics; a decoded message encodes to a frame whose length prefix is right and whose
//! body decodes to the same message, byte for byte the input when it was a body of the
//! version the message is sent in (the oldest that can carry it); the offer peek agrees with the full decode; the header parsers take
//! any bytes and give back what they read.

use barge::proto::limits::MAX_MESSAGE;
use barge::proto::wire::{data_stream_header, parse_data_stream_header, BlockHeader, Message, OLDEST_VERSION, VERSION};

pub fn run(data: &[u8]) {
    let decoded = Message::decode(data);
    if let Ok(msg) = &decoded {
        round_trip(data, msg);
    }
    peek(data, decoded.as_ref().ok());
    headers(data);
}

fn round_trip(body: &[u8], msg: &Message) {
    // What the decoder takes, the encoder's checks (the same limits) take too.
    let frame = msg.encode().expect("a decoded message passes the encoder's checks");
    let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes"));
    assert_eq!(len as usize, frame.len() - 4, "length prefix");
    let again = Message::decode(&frame[4..]).expect("a re-encoded message decodes");
    assert_eq!(&again, msg, "decode(encode(m)) == m");
    if body[0] == msg.version() {
        assert_eq!(
            &frame[4..],
            body,
            "the encoding of a message in its own version is canonical"
        );
    }
}

fn peek(body: &[u8], decoded: Option<&Message>) {
    let prefix = &body[..body.len().min(Message::PEEK_LEN)];
    let peeked = Message::peek_offer_target(prefix);
    match decoded {
        Some(Message::Offer(offer)) => assert_eq!(peeked, Ok(Some(offer.target.clone())), "peeked target"),
        Some(_) => assert_eq!(peeked, Ok(None), "peek of a message that is not an offer"),
        None => {}
    }
}

fn headers(data: &[u8]) {
    if let Some(len) = data.get(..4) {
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes"));
        match Message::check_frame_len(len) {
            Ok(n) => assert!(n as u64 == len as u64 && n as u64 <= MAX_MESSAGE),
            Err(_) => assert!(len as u64 > MAX_MESSAGE),
        }
    }
    if let Some(b) = data.get(..BlockHeader::LEN) {
        let b: &[u8; 12] = b.try_into().expect("12 bytes");
        assert_eq!(&BlockHeader::decode(b).encode(), b, "block header round trip");
    }
    if let Some(h) = data.get(..17) {
        let h: &[u8; 17] = h.try_into().expect("17 bytes");
        match parse_data_stream_header(h) {
            Ok(job) => assert_eq!(data_stream_header(job)[1..], h[1..], "data stream header round trip"),
            Err(_) => assert!(!(OLDEST_VERSION..=VERSION).contains(&h[0]), "a known version refused"),
        }
    }
}
