//! The ciphertext format: arbitrary bytes given to `check_format` and `KekCipher::open`
//! must never panic, and whatever opens must be consistent with the format. The same
//! bytes, taken as a plaintext, must seal and open again, and a sealed value with one bit
//! flipped, a byte cut off or another key_id must not open.
//!
//! Input: `ctl` (1 byte: key_id and annotations digest), the local KEK (32 bytes, zero
//! padded when the input is shorter), then the body.
#![no_main]

use kms_plugin::envelope::{
    EnvelopeError, FORMAT_V1, KekCipher, MAX_PLAINTEXT_LEN, OVERHEAD, associated_data, check_format,
};
use kms_plugin::secret::Key256;
use libfuzzer_sys::fuzz_target;

const KEY_IDS: [&str; 4] = [
    "file-0123456789abcdef0123456789abcdef",
    "aws-0123456789abcdef0123456789abcdef",
    "pkcs11-00",
    "",
];

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let (key_bytes, body) = rest.split_at(rest.len().min(32));
    let mut key = [0u8; 32];
    key[..key_bytes.len()].copy_from_slice(key_bytes);
    let Some(kek) = Key256::from_slice(&key) else {
        panic!("32 bytes are a key");
    };
    let cipher = KekCipher::new(&kek);
    let key_id = KEY_IDS[usize::from(ctl & 3)];
    let aad = associated_data(key_id, &[ctl >> 2; 32]);

    // The body as a ciphertext from kube-apiserver (i.e. from etcd).
    let format = check_format(body);
    match cipher.open(&aad, body) {
        Ok(plain) => {
            assert!(format.is_ok());
            assert_eq!(plain.len() + OVERHEAD, body.len());
        }
        Err(e) => match format {
            Err(f) => assert_eq!(e, f),
            Ok(()) => assert_eq!(e, EnvelopeError::Authentication),
        },
    }

    // The body as a plaintext: seal, open, tamper.
    let plain = &body[..body.len().min(MAX_PLAINTEXT_LEN)];
    let sealed = cipher.seal(&aad, plain);
    assert_eq!(sealed.len(), plain.len() + OVERHEAD);
    assert_eq!(sealed[0], FORMAT_V1);
    assert_eq!(check_format(&sealed), Ok(()));
    match cipher.open(&aad, &sealed) {
        Ok(opened) => assert_eq!(opened.as_slice(), plain),
        Err(e) => panic!("a sealed value does not open: {e}"),
    }

    let position = usize::from(ctl).wrapping_mul(7) % sealed.len();
    let mut flipped = sealed.clone();
    flipped[position] ^= 1 << (ctl % 8);
    assert!(
        cipher.open(&aad, &flipped).is_err(),
        "bit flip at {position} opened"
    );

    let cut = &sealed[..sealed.len() - 1];
    assert!(cipher.open(&aad, cut).is_err(), "truncated value opened");

    let other_id = associated_data(KEY_IDS[usize::from((ctl & 3) ^ 1)], &[ctl >> 2; 32]);
    assert_eq!(
        cipher.open(&other_id, &sealed),
        Err(EnvelopeError::Authentication)
    );
    let other_annotations = associated_data(key_id, &[!(ctl >> 2); 32]);
    assert_eq!(
        cipher.open(&other_annotations, &sealed),
        Err(EnvelopeError::Authentication)
    );
});
