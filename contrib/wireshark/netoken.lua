-- Wireshark / tshark dissector for the netoken TCP option (design.md §2).
--
--   kind (253|254) | len 16 | ExID (2) | key id | epoch & 0xff | nonce (6) | tag (4)   mac mode
--   kind (253|254) | len 12 | ExID (2) | token (8, big endian)                       static mode
--
-- This is wire format 2 (design.md §2).  Format 1 (nonce 4, tag 6) was never
-- deployed and is not decoded.
--
-- Install: copy to ~/.local/lib/wireshark/plugins/ (or the "Personal Lua Plugins"
-- folder shown in Help > About > Folders), or load it for one run:
--   tshark -X lua_script:netoken.lua -r syn.pcap -Y netoken -T fields -e netoken.key_id
--
-- The option is registered in Wireshark's "tcp.option" table for kinds 253 and
-- 254, which is where the built-in RFC 6994 "Experimental" dissector lives.
-- Options of those kinds with another ExID (TCP Fast Open's 0xF989, other
-- experiments) are handed back to that built-in dissector, so loading this
-- file changes nothing for them.  The ExID is a preference (Edit >
-- Preferences > Protocols > NETOKEN, or `-o netoken.exid:0x1234`) because
-- it is configurable in netoken's [option] table.
--
-- Verifying the tag needs the key; `netoken decode PCAP -c netoken.toml` does that.

local netoken = Proto("netoken", "netoken TCP option")

local MAC_LEN, STATIC_LEN = 16, 12
local KINDS = { 253, 254 }

local f = netoken.fields
f.kind = ProtoField.uint8("netoken.kind", "Kind", base.DEC)
f.len = ProtoField.uint8("netoken.len", "Length", base.DEC)
f.exid = ProtoField.uint16("netoken.exid", "ExID", base.HEX)
f.mode = ProtoField.string("netoken.mode", "Mode")
f.key_id = ProtoField.uint8("netoken.key_id", "Key id", base.DEC)
f.epoch = ProtoField.uint8("netoken.epoch", "Epoch (low 8 bits)", base.DEC)
f.nonce = ProtoField.bytes("netoken.nonce", "Nonce")
f.tag = ProtoField.bytes("netoken.tag", "Tag (SipHash-2-4, 32 bits)")
f.token = ProtoField.uint64("netoken.token", "Static token", base.HEX)

local bad_len = ProtoExpert.new("netoken.bad_len", "netoken option length is neither 16 (mac) nor 12 (static)",
  expert.group.MALFORMED, expert.severity.WARN)
netoken.experts = { bad_len }

netoken.prefs.exid = Pref.string("ExID", "0x6E74",
  "RFC 6994 experiment id of netoken options ([option] exid in netoken.toml)")

-- Looked up before we replace them, so other experiments keep their decoding.
local option_table = DissectorTable.get("tcp.option")
local builtin = {}
for _, kind in ipairs(KINDS) do
  builtin[kind] = option_table:get_dissector(kind)
end

local function wanted_exid()
  -- tonumber understands both "0x6E74" and "28276"; a typo falls back to the default.
  return tonumber(netoken.prefs.exid) or 0x6E74
end

local function hand_back(kind, tvb, pinfo, tree)
  local d = builtin[kind]
  if d then
    return d:call(tvb, pinfo, tree)
  end
  return 0
end

-- TVB is the whole option, kind and length included (that is what the
-- tcp.option table passes).
function netoken.dissector(tvb, pinfo, tree)
  local kind = tvb(0, 1):uint()
  if tvb:len() < 4 or tvb(2, 2):uint() ~= wanted_exid() then
    return hand_back(kind, tvb, pinfo, tree)
  end
  local len = tvb:len()
  local t = tree:add(netoken, tvb(), "netoken")
  t:add(f.kind, tvb(0, 1))
  t:add(f.len, tvb(1, 1))
  t:add(f.exid, tvb(2, 2))
  if len == MAC_LEN then
    t:add(f.mode, "mac")
    t:add(f.key_id, tvb(4, 1))
    t:add(f.epoch, tvb(5, 1))
    t:add(f.nonce, tvb(6, 6))
    t:add(f.tag, tvb(12, 4))
    t:append_text(string.format(" (mac, key %d, epoch %d)", tvb(4, 1):uint(), tvb(5, 1):uint()))
    pinfo.cols.info:append(string.format(" [netoken key %d]", tvb(4, 1):uint()))
  elseif len == STATIC_LEN then
    t:add(f.mode, "static")
    t:add(f.token, tvb(4, 8))
    t:append_text(" (static)")
    pinfo.cols.info:append(" [netoken static]")
  else
    t:add_proto_expert_info(bad_len, string.format("netoken option length %d is neither 16 nor 12", len))
  end
  return len
end

for _, kind in ipairs(KINDS) do
  option_table:add(kind, netoken)
end
