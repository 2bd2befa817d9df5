//! Fuzz target: what encryption trusts from outside. The input is an OPEN's key payload
//! (size byte, then the key) followed by a batmap header (the keyhash an image records).
//! Neither may panic: a key payload that decodes is checked against the header's keyhash
//! (a match only when the hash really is SHA-256 of nonce and key), and a key XTS accepts
//! encrypts and decrypts sectors back to what they were, whatever the sector number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::batmap::BatmapHeader;
use vhd::crypt::{check_key, keyhash, KeyError, SectorCipher, DATA_UNIT};

fuzz_target!(|data: &[u8]| {
    let Some((&size_byte, rest)) = data.split_first() else {
        return;
    };
    let Ok(size) = tapdisk_proto::decode_key_size(size_byte) else {
        return;
    };
    let Some((key, header_bytes)) = rest.split_at_checked(size) else {
        return;
    };
    let stored = BatmapHeader::parse(header_bytes, 0).ok().map(|h| h.keyhash);
    match check_key(stored.as_ref(), key) {
        Ok(()) => {
            let stored = stored.expect("a match needs a keyhash");
            assert_ne!(stored.cookie, 0);
            assert_eq!(keyhash(&stored.nonce, key), stored.hash);
        }
        Err(KeyError::NoKeyhash) => assert!(stored.is_none_or(|k| k.cookie == 0)),
        Err(KeyError::Mismatch) => {
            let stored = stored.expect("a mismatch needs a keyhash");
            assert_ne!(keyhash(&stored.nonce, key), stored.hash);
        }
        Err(KeyError::Size(_)) => unreachable!("check_key does not look at the size"),
    }
    if let Ok(cipher) = SectorCipher::new(key) {
        let sector = u64::from_le_bytes(
            header_bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        );
        let mut sectors = vec![0u8; 2 * DATA_UNIT];
        for (i, b) in sectors.iter_mut().enumerate() {
            *b = header_bytes.get(i).copied().unwrap_or(0);
        }
        let original = sectors.clone();
        cipher.encrypt_sectors(sector, &mut sectors);
        cipher.decrypt_sectors(sector, &mut sectors);
        assert_eq!(sectors, original);
    }
});
