"""Write pe_4to1_votca.xml: the VOTCA CSG mapping equivalent to systems/mappings/polyethylene_4to1.yaml.

One 48-atom united-atom PE chain (one residue PE, atoms C1..C48), 4 atoms per bead, beads B1..B12 of type
C4, centre-of-mass weights (CH3 ends 15.035 amu, CH2 14.027 amu), linear bonds, angles and dihedrals.
Run: python tests/data/mapping/make_pe_votca.py
"""
from pathlib import Path

N_ATOMS, PER = 48, 4
CH3, CH2 = "15.035", "14.027"


def main():
    nb = N_ATOMS // PER
    lines = ["<cg_molecule>", "  <name>PE</name>  <!-- CG residue name -->",
             "  <ident>PE</ident>  <!-- atomistic molecule: chains whose residue is PE -->", "  <topology>",
             "    <cg_beads>"]
    for k in range(nb):
        atoms = " ".join(f"1:PE:C{k * PER + j + 1}" for j in range(PER))
        mapname = "END1" if k == 0 else "END2" if k == nb - 1 else "MID"
        lines += ["      <cg_bead>", f"        <name>B{k + 1}</name>", "        <type>C4</type>",
                  f"        <mapping>{mapname}</mapping>", f"        <beads>{atoms}</beads>", "      </cg_bead>"]
    lines += ["    </cg_beads>", "    <cg_bonded>"]
    for tag, width in (("bond", 2), ("angle", 3), ("dihedral", 4)):
        rows = [" ".join(f"B{k + j + 1}" for j in range(width)) for k in range(nb - width + 1)]
        lines += [f"      <{tag}>", f"        <name>{tag}</name>", "        <beads>"]
        lines += [f"          {r}" for r in rows]
        lines += ["        </beads>", f"      </{tag}>"]
    lines += ["    </cg_bonded>", "  </topology>", "  <maps>"]
    for name, w in (("END1", [CH3, CH2, CH2, CH2]), ("MID", [CH2] * 4), ("END2", [CH2, CH2, CH2, CH3])):
        lines += ["    <map>", f"      <name>{name}</name>", f"      <weights>{' '.join(w)}</weights>", "    </map>"]
    lines += ["  </maps>", "</cg_molecule>"]
    out = Path(__file__).with_name("pe_4to1_votca.xml")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
