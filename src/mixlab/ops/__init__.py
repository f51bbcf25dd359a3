"""Operations shared by several model families."""
