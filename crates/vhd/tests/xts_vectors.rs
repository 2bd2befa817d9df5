//! XTS-AES test vectors from IEEE Std 1619-2007 (Annex B), and the tapdisk data layout:
//! one 512-byte unit per virtual sector, tweaked by the sector's low 32 bits.
//!
//! Vectors 2 and 3 (32-byte units) are given whole in the standard; for vectors 4 and 10
//! (512-byte units) the standard's published ciphertext is reproduced here in full as
//! OpenSSL's `EVP_aes_*_xts` (the library the C tapdisk encrypts with) computes it, the
//! standard's first 32 bytes checked separately. Vector 1 (key1 = key2 = 0) is left out:
//! it is the one case XTS implementations are required to refuse nowadays (equal halves).

use vhd::crypt::{sector_tweak, SectorCipher, DATA_UNIT};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn tweak(dusn: u128) -> [u8; 16] {
    dusn.to_le_bytes()
}

fn check(key: &str, dusn: u128, plain: &[u8], cipher: &str) {
    let key = unhex(key);
    let xts = SectorCipher::new(&key).unwrap();
    let mut data = plain.to_vec();
    xts.encrypt_unit(&mut data, tweak(dusn));
    assert_eq!(data, unhex(cipher), "encrypting with dusn {dusn:#x}");
    xts.decrypt_unit(&mut data, tweak(dusn));
    assert_eq!(data, plain, "decrypting with dusn {dusn:#x}");
}

fn counting_512() -> Vec<u8> {
    (0..=255u8).chain(0..=255u8).collect()
}

#[test]
fn ieee_1619_vector_2() {
    check(
        "1111111111111111111111111111111122222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    );
}

#[test]
fn ieee_1619_vector_3() {
    check(
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    );
}

const VECTOR_4: &str = concat!(
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa",
    "7f56000005279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc",
    "512c8866c7e860ce93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4",
    "c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f91",
    "72af82b604dc4b8e51bcb08235a6f4341332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f",
    "1badd03c5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91",
    "735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc1e08298516e2c9ed03ff3c1b7860f6de76d4cecd",
    "94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344",
    "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd74d20cc39881c213ee770b10",
    "10e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539e",
    "db609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18deb4a427d",
    "1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568",
);

#[test]
fn ieee_1619_vector_4_xts_aes_128() {
    assert!(
        VECTOR_4.starts_with("27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c")
    );
    check(
        "2718281828459045235360287471352631415926535897932384626433832795",
        0,
        &counting_512(),
        VECTOR_4,
    );
}

const VECTOR_10: &str = concat!(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9",
    "ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f2",
    "7d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d",
    "7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834",
    "f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1",
    "a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070",
    "c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec",
    "4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a41",
    "0e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed",
    "5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38",
    "014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
);

#[test]
fn ieee_1619_vector_10_xts_aes_256() {
    assert!(
        VECTOR_10.starts_with("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")
    );
    check(
        concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ),
        0xff,
        &counting_512(),
        VECTOR_10,
    );
}

/// Two sectors at virtual sector 0x1_2345_6789 under key bytes 0..63 (XTS-AES-256), sector
/// i filled with i + 1: as OpenSSL computes them with the C tapdisk's IV (the sector's low
/// 32 bits): the tweak wraps at 2^32 sectors (2 TiB), as in the C stack.
const TAPDISK_LAYOUT: &str = concat!(
    "e6aee90a0d834aba2a0c96a2baa064eaa42300b3c723dbcb3c5d8b0b3b52ea75dba9033ce53a6eb44d4ed144",
    "9da4e12336e3c1a13024c0d2e04c6f1b22bd2d0c15e46481e495c525b67bdbcc84d8eaf79aa376c09919e6fd",
    "25ba39a7c9ef87aa0c3ea09d3d590285f96fca99ded071ad2b09ec68c51b0275a9730fa4d74ead49ae102dae",
    "e12b89eb2cda158639ba5047528bdc67c9a480ce0f0be8bc8b9e40ec201734d9f7fb5a0b9e41e1c08ad7e49e",
    "d333f0d1a0331dd366b7995ea00c831fdfc35a73749fa83ac382ee45e0a2fb4bc6885bb2ec171a61d55eb249",
    "22590cdb766ab622572c20c170aa0c8322270faf0f0608602b8a827e4b7a5b531800907bbb2fe9b2ce1b4a97",
    "21a2a6745e431f17558bddbbda472f7ed560576128c1c0873445114f3d7b6b83f5f21004f9e561a8843bbbd7",
    "bd608404ac70da6509551f15f0451847afcf9833e902d68f7004fea2a7d1ed67a7138b1b42781c149e017f4f",
    "02e8ce6ea8e9655c7240f9a591c731519c4aefb4a46c56f209e95433919ebd4e86be9651cda5ebb6f3fa0102",
    "aabf87fb5717047741f3d89524c00fe61cbcfc374658ca554f558f6cf89a9c683e19a8c7bf2812924b540b85",
    "530c3e73d22d5c13bb11ad351248dbfeb1cb570a1a6984d5b7adce0fce4791ebd32db5501532cf9dc9f46722",
    "1508ab05de8034a2f943f3c0ddf1ad255ce3cd259f400ef95fb64c4263b1a84588d0a28c3632120466a4826f",
    "3956953b137708d81367be5d962156f2d802d74da8a959a2baec79ebf869046976757b41b4b804feb3091566",
    "5dcf96fa3f40c5eac0ee53d9876d8a2f1b0d59d5dc9ca05656b4944ed65f8e87beae99b47835f671d352dc74",
    "7219cf7ed377b4669936c806a8670dc5c659748907ee1fa6dd6040c2ebdd84016d1489cdcd95cb149871373d",
    "ef04a0422270506ba689de1478b4c9d0b27214ca1b3e68d6352fd36272d5f7bad8ddde4b3320954ea41fada9",
    "0bd9b7e1e2a9107cb606dbe4ec0431dde59409bd5c38db8161746a6f7d52f899d6bf904831bd8840192c384a",
    "5ce521a7cf491a8370566ab9f3090c95904221ff1a0d9b2d578b0e6463a03bf1ef4a65304c23996ff6d9f7c5",
    "9215280ebaefdd746f26ed79cda6b8cd8f17a28aaf9e64f317f955531c6d8c4581e67ea282a00c67bc7c3883",
    "a107749307c3fba159cd8bfdfebf1a190c4293830fce61de04f990e3003d00ce020244ba4e37aadc65ed5d62",
    "c1a9563c2fdc6c09963af4b3223fe941ec1094583ec52a8e6ab21c244ca63f855bde2587d2320aa67363a87a",
    "7795d6136d04191eab27a1ca9fd18c81fbd25a6dd623590154ab4dde11fac5f6f52c5d71d0b91c0ee7d73f6b",
    "af3eb0d519851bcadfc805c1d14a17f0f76c25d8f087afda841ad076a592d8177fd237158efe02d384579537",
    "1501c26ad157cd9e1d241fcd",
);

#[test]
fn sectors_are_tweaked_by_their_low_32_bits() {
    let key: Vec<u8> = (0..64).collect();
    let xts = SectorCipher::new(&key).unwrap();
    let mut data = vec![1u8; DATA_UNIT];
    data.extend_from_slice(&[2u8; DATA_UNIT]);
    let plain = data.clone();
    xts.encrypt_sectors(0x1_2345_6789, &mut data);
    assert_eq!(data, unhex(TAPDISK_LAYOUT));
    // The same bytes at sector 0x2345_6789 (2^32 sectors lower) encrypt alike.
    let mut again = plain.clone();
    xts.encrypt_sectors(0x2345_6789, &mut again);
    assert_eq!(again, data);
    // One sector on, every unit differs.
    let mut shifted = plain.clone();
    xts.encrypt_sectors(0x1_2345_678a, &mut shifted);
    assert_ne!(shifted[..DATA_UNIT], data[DATA_UNIT..]);
    xts.decrypt_sectors(0x1_2345_6789, &mut data);
    assert_eq!(data, plain);
    assert_eq!(sector_tweak(0x1_2345_6789)[..4], [0x89, 0x67, 0x45, 0x23]);
}
